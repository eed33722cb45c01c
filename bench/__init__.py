"""The benchmark of trio-bridge against websockify 0.13 (``./dev bench``, ``python -m bench``).

Both proxies run as subprocesses in front of the same target process and are driven by
the same client code, so every difference in the figures comes from the proxy. Only
the proxy's own process tree is measured (CPU and memory); the client and target report
how busy they were so that a reader can check they were not the bottleneck.

Modules:

- :mod:`bench.procstat`: CPU and PSS of a process tree, file-descriptor limits;
- :mod:`bench.proxies`: starting and stopping the proxies and the target;
- :mod:`bench.target`: the target server (a separate process: source, sink or echo);
- :mod:`bench.wsclient`: the lean WebSocket client (websockets' sans-I/O handshake,
  pre-built masked frames, a frame reader that skips payloads without copying);
- :mod:`bench.scenarios`: bulk throughput and round trips over one session;
- :mod:`bench.sessions`: many concurrent sessions, on Trio;
- :mod:`bench.soak`: the soak (``--soak``): thousands of paced echo sessions and a few
  bulk ones through one trio-bridge for minutes, every byte checked, RSS and
  descriptors sampled;
- :mod:`bench.report`: the table, the targets and docs/performance.md.
"""
