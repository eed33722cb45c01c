"""The floor under a small message: what a relay costs before any WebSocket work.

``python -m bench.floor [--rounds N] [--round-trips N]`` (or ``./dev bench --floor``)

Issue 13 asks for a 64-byte round trip at <= 0.8x websockify's CPU and p50. This
bench asks what the least any Python relay pays is, on this machine, in the same run
as both proxies, with the same client, target and core pinning as ``python -m bench``.
Four relays carry the same session (websockets' handshake, then 64-byte binary
messages echoed by the target, one in flight):

- ``select floor``: one ``select()`` loop per connection, websockify's shape;
- ``trio floor``: one Trio task per direction waiting in ``wait_readable``, trio-bridge's
  shape (the same system calls per message: recv, send, and Trio's epoll re-arm);
- ``trio-bridge`` and ``websockify`` as operators run them.

The two floors do the least work a WebSocket relay can: one read, a length byte, an
unmasking by websockets' C ``apply_mask``, one write. They check nothing (no UTF-8, no
control frames, no limits, no close handshake, no fragmentation, no 64-bit lengths):
they are a measuring stick, never a server. What remains between a floor and a proxy
is the proxy's own protocol work.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.utils import apply_mask

from bench.procstat import cpu_layout, pin, raise_fd_limit
from bench.proxies import (
    TRIO_BRIDGE,
    WEBSOCKIFY,
    ProxySpec,
    RunningProxy,
    TargetProcess,
    frozen_source,
)
from bench.scenarios import Meter, round_trips
from trio_bridge.netio import send_all
from trio_bridge.zerocopy import binary_frame_header

# Below glibc's mmap threshold (128 KiB until a larger block is freed): a larger recv()
# buffer costs an mmap, an mremap and a munmap per call, about 15 us here.
RECV_SIZE = 64 * 1024
TARGET_RATIO = 0.8  # issue 13: CPU per round trip and p50, against websockify


# -- the two floor relays ------------------------------------------------------------


def _handshake(client: socket.socket) -> None:
    """websockets' opening handshake on a blocking socket (the client sends nothing more
    before the response, so nothing is read past the request)."""
    protocol = ServerProtocol()
    while protocol.state is State.CONNECTING:
        data = client.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        protocol.receive_data(data)
        for request in protocol.events_received():
            protocol.send_response(protocol.accept(request))  # type: ignore[arg-type]
        for chunk in protocol.data_to_send():
            client.sendall(chunk)


def _unframe(buffer: bytearray) -> tuple[bytes, bool]:
    """The payload of every complete masked frame in ``buffer`` (removed from it), and
    whether a close frame was among them."""
    payload = bytearray()
    while len(buffer) >= 6:
        length = buffer[1] & 0x7F
        start = 6
        if length == 126:
            length, start = int.from_bytes(buffer[2:4], "big"), 8
        if len(buffer) < start + length:
            break
        if buffer[0] & 0x0F == 0x8:
            return bytes(payload), True
        mask = bytes(buffer[start - 4 : start])
        payload += apply_mask(bytes(buffer[start : start + length]), mask)
        del buffer[: start + length]
    return bytes(payload), False


def _select_relay(client: socket.socket, target: socket.socket) -> None:
    buffer = bytearray()
    while True:
        readable, _, _ = select.select([client, target], [], [])
        if client in readable:
            data = client.recv(RECV_SIZE)
            buffer += data
            payload, closing = _unframe(buffer)
            if payload:
                target.sendall(payload)
            if closing or not data:
                return
        if target in readable:
            data = target.recv(RECV_SIZE)
            if not data:
                return
            client.sendall(binary_frame_header(len(data)) + data)


def _trio_relay(client: socket.socket, target: socket.socket) -> None:
    async def upstream(cancel: trio.CancelScope) -> None:
        buffer = bytearray()
        while True:
            await trio.lowlevel.wait_readable(client)
            data = client.recv(RECV_SIZE)
            buffer += data
            payload, closing = _unframe(buffer)
            if payload:
                await send_all(target, payload)
            if closing or not data:
                cancel.cancel()
                return

    async def downstream(cancel: trio.CancelScope) -> None:
        while True:
            await trio.lowlevel.wait_readable(target)
            data = target.recv(RECV_SIZE)
            if not data:
                cancel.cancel()
                return
            await send_all(client, binary_frame_header(len(data)) + data)

    async def main() -> None:
        client.setblocking(False)
        target.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream, nursery.cancel_scope)
            nursery.start_soon(downstream, nursery.cancel_scope)

    trio.run(main)


RELAYS: dict[str, Callable[[socket.socket, socket.socket], None]] = {
    "select": _select_relay,
    "trio": _trio_relay,
}


def serve_floor(kind: str, port: int, target_port: int) -> None:
    """Serve sessions one after another (the bench opens one at a time)."""
    relay = RELAYS[kind]
    with socket.create_server(("127.0.0.1", port)) as listener:
        while True:
            client, _ = listener.accept()
            target = socket.create_connection(("127.0.0.1", target_port))
            for sock in (client, target):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                _handshake(client)
                relay(client, target)
            except OSError:
                pass
            finally:
                client.close()
                target.close()


def _floor_spec(kind: str) -> ProxySpec:
    def argv(port: int, target_port: int) -> list[str]:
        return [sys.executable, "-m", "bench.floor", "--serve", kind, str(port), str(target_port)]

    return ProxySpec(f"{kind} floor", argv)


# -- the measurement -----------------------------------------------------------------


def measure(rounds: int, count: int) -> dict[str, list[tuple[float, float]]]:
    """(CPU us per round trip, p50 us) of every relay, ``rounds`` times, alternating."""
    specs = [_floor_spec("select"), _floor_spec("trio"), TRIO_BRIDGE, WEBSOCKIFY]
    layout = cpu_layout()
    proxy_cpus, load_cpus = layout if layout else (None, None)
    results: dict[str, list[tuple[float, float]]] = {spec.name: [] for spec in specs}
    with (
        TargetProcess(load_cpus) as target,
        frozen_source("trio_bridge") as source,
        tempfile.TemporaryDirectory(prefix="bench-floor-") as logs,
    ):
        pin(load_cpus)  # the client, like the target, off the proxy's core
        for round_no in range(1, rounds + 1):
            for spec in specs:
                log = Path(logs) / f"{spec.name.replace(' ', '_')}.log"
                with RunningProxy(spec, target.port, log, proxy_cpus, source_root=source) as proxy:
                    result = round_trips(proxy.port, Meter(proxy.pid, target.pid), count, 60.0)
                results[spec.name].append((result.cpu_us_per_rt, result.p50_us))
                print(
                    f"round {round_no}: {spec.name:12} {result.cpu_us_per_rt:6.1f} CPU us/rt "
                    f"p50 {result.p50_us:6.1f} us",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def print_table(results: dict[str, list[tuple[float, float]]], rounds: int, count: int) -> None:
    medians = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in results.items()
    }
    peer_cpu, peer_p50 = medians[WEBSOCKIFY.name]
    print(
        f"\n64-byte round trips, one session, {count:,} per round; medians of {rounds} rounds; "
        f"ratios against websockify (issue 13's target: <= {TARGET_RATIO}x)\n"
    )
    print("| relay | CPU us per round trip | ratio | p50 us | ratio |")
    print("|---|---|---|---|---|")
    for name, (cpu, p50) in medians.items():
        print(f"| {name} | {cpu:.1f} | {cpu / peer_cpu:.2f}x | {p50:.1f} | {p50 / peer_p50:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are medians (5)")
    parser.add_argument("--round-trips", type=int, default=10_000, help="per round (10000)")
    parser.add_argument(
        "--serve", nargs=3, metavar=("KIND", "PORT", "TARGET_PORT"), help=argparse.SUPPRESS
    )
    options = parser.parse_args()
    if options.serve:
        kind, port, target_port = options.serve
        serve_floor(kind, int(port), int(target_port))
        return
    raise_fd_limit()
    results = measure(options.rounds, options.round_trips)
    print_table(results, options.rounds, options.round_trips)


if __name__ == "__main__":
    main()
