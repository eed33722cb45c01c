"""Many sessions at once through one proxy: trio-bridge ``--workers 1``, ``--workers 2``
and websockify, in the same run (issue 13's benchmark).

    python -m bench.aggregate [--duration S] [--rounds N]

Three loads, each on its own: 32 round-trip sessions (64-byte messages, one in flight
per session, from 4 client processes of 8 sessions each), 8 bulk sessions downstream and
8 upstream (one client process each). Everything shares the machine's cores: the proxy,
its workers, the clients and the target. Figures are aggregates over all sessions
(round trips per second, MiB/s), medians of the rounds; ratios are against websockify.

A second table gives the proxy's own CPU per unit of work over the same windows (its
whole process tree: the main process and its workers, or websockify and its forked
handlers): on a machine whose cores the clients and the target share, the aggregate
rate depends on their cost too, and this is the part that is the proxy's.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import selectors
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import wire
from bench.procstat import tree_cpu_seconds
from bench.proxies import (
    TRIO_BRIDGE,
    WEBSOCKIFY,
    ProxySpec,
    RunningProxy,
    TargetProcess,
    frozen_source,
)
from bench.scenarios import DOWN_BATCH, IO_TIMEOUT, RT_SIZE, UP_ACK_EVERY, UP_FRAME
from bench.wsclient import FrameReader, binary_frame, open_session

RT_SESSIONS, RT_PROCESSES = 32, 4
BULK_SESSIONS = 8
START_DELAY = 1.5  # seconds for every client process to open its sessions first

TARGETS = {"round_trips": 1.25, "upstream": 1.6, "downstream": 1.3}  # --workers 2 / websockify


def _with_workers(count: int) -> ProxySpec:
    def argv(port: int, target_port: int) -> list[str]:
        return [*TRIO_BRIDGE.argv(port, target_port), "--workers", str(count)]

    return ProxySpec(f"trio-bridge --workers {count}", argv, package="trio_bridge")


def _wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def round_trip_client(port: int, sessions: int, start: float, duration: float) -> int:
    """Round trips completed in [start, start + duration) over ``sessions`` sessions."""
    socks = [open_session(port, IO_TIMEOUT) for _ in range(sessions)]
    readers = [FrameReader(sock, size=64 << 10) for sock in socks]
    frame = binary_frame(os.urandom(RT_SIZE))
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        sock.sendall(binary_frame(wire.echo_start()))
        selector.register(sock, selectors.EVENT_READ, index)
    _wait_until(start)
    for sock in socks:
        sock.sendall(frame)
    done, end = 0, start + duration
    while time.time() < end:
        for key, _ in selector.select(timeout=0.5):
            index = key.data
            got = readers[index].payload()
            while len(got) < RT_SIZE:
                got += readers[index].payload()
            done += 1
            socks[index].sendall(frame)
    for sock in socks:
        sock.close()
    return done


def downstream_client(port: int, start: float, duration: float) -> int:
    """Bytes read from the target in [start, start + duration), asking a batch ahead."""
    with contextlib.closing(open_session(port, IO_TIMEOUT)) as sock:
        reader = FrameReader(sock, discard=True)
        _wait_until(start)
        requested, received, end = 2 * DOWN_BATCH, 0, start + duration
        sock.sendall(binary_frame(wire.down_start(requested)))
        while time.time() < end:
            received += reader.skip_frame()
            if requested - received <= DOWN_BATCH:
                sock.sendall(binary_frame(wire.down_more(DOWN_BATCH)))
                requested += DOWN_BATCH
    return received


def upstream_client(port: int, start: float, duration: float) -> int:
    """Bytes the target acknowledged by start + duration."""
    chunk = binary_frame(os.urandom(UP_FRAME)) * 16
    with contextlib.closing(open_session(port, IO_TIMEOUT)) as sock:
        reader = FrameReader(sock)
        sock.sendall(binary_frame(wire.up_start(UP_ACK_EVERY)))
        _wait_until(start)
        end, sent = start + duration, 0
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        acked = 0
        while time.time() < end:
            sock.sendall(chunk)
            sent += UP_FRAME * 16
            if selector.select(timeout=0):
                acked += len(reader.payload()) * UP_ACK_EVERY
    return acked


def _parallel(
    jobs: list[tuple[Callable[..., int], tuple[object, ...]]],
    proxy_pid: int,
    start: float,
    duration: float,
) -> tuple[list[int], float]:
    """Each job's result, and the proxy tree's CPU seconds over [start, start + duration)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(len(jobs)) as pool:
        pending = [pool.apply_async(function, args) for function, args in jobs]
        _wait_until(start)
        before = tree_cpu_seconds(proxy_pid)
        _wait_until(start + duration)
        cpu = tree_cpu_seconds(proxy_pid) - before
        return [job.get(timeout=IO_TIMEOUT * 4) for job in pending], cpu


def measure(port: int, proxy_pid: int, duration: float) -> dict[str, float]:
    per_process = RT_SESSIONS // RT_PROCESSES
    start = time.time() + START_DELAY
    rts, rt_cpu = _parallel(
        [(round_trip_client, (port, per_process, start, duration))] * RT_PROCESSES,
        proxy_pid,
        start,
        duration,
    )
    start = time.time() + START_DELAY
    down, down_cpu = _parallel(
        [(downstream_client, (port, start, duration))] * BULK_SESSIONS, proxy_pid, start, duration
    )
    start = time.time() + START_DELAY
    up, up_cpu = _parallel(
        [(upstream_client, (port, start, duration))] * BULK_SESSIONS, proxy_pid, start, duration
    )
    mib = duration * (1 << 20)
    return {
        "round_trips": sum(rts) / duration,
        "downstream": sum(down) / mib,
        "upstream": sum(up) / mib,
        "round_trips_cpu": rt_cpu / max(1, sum(rts)) * 1e6,  # us per round trip
        "downstream_cpu": down_cpu / max(1, sum(down)) * (1 << 30),  # s per GiB
        "upstream_cpu": up_cpu / max(1, sum(up)) * (1 << 30),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregate", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (3)")
    options = parser.parse_args()
    specs = [_with_workers(1), _with_workers(2), WEBSOCKIFY]
    results: dict[str, list[dict[str, float]]] = {spec.name: [] for spec in specs}
    with (
        TargetProcess() as target,
        frozen_source("trio_bridge") as source,
        tempfile.TemporaryDirectory(prefix="bench-aggregate-") as logs,
    ):
        for round_no in range(1, options.rounds + 1):
            for spec in specs:
                log = Path(logs) / f"{spec.name.replace(' ', '_')}.log"
                with RunningProxy(spec, target.port, log, source_root=source) as proxy:
                    figures = measure(proxy.port, proxy.pid, options.duration)
                results[spec.name].append(figures)
                shown = ", ".join(f"{k} {v:,.2f}" for k, v in figures.items())
                print(f"round {round_no}: {spec.name}: {shown}", flush=True)
    print_table(results, specs, options)


def print_table(
    results: dict[str, list[dict[str, float]]], specs: list[ProxySpec], options: argparse.Namespace
) -> None:
    medians = {
        name: {k: statistics.median(r[k] for r in rounds) for k in TARGETS}
        for name, rounds in results.items()
    }
    peer = medians[WEBSOCKIFY.name]
    units = {"round_trips": "round trips/s", "downstream": "MiB/s", "upstream": "MiB/s"}
    print(
        f"\n{os.cpu_count()} cores; {RT_SESSIONS} round-trip sessions, {BULK_SESSIONS} bulk "
        f"sessions each way; {options.rounds} rounds of {options.duration:g} s, medians\n"
    )
    print(
        "| load | "
        + " | ".join(spec.name for spec in specs)
        + " | --workers 2 / websockify | target |"
    )
    print("|---" * (len(specs) + 3) + "|")
    for load, target in TARGETS.items():
        row = [f"{medians[spec.name][load]:,.0f}" for spec in specs]
        ratio = medians[_with_workers(2).name][load] / peer[load]
        met = "met" if ratio >= target else "NOT MET"
        print(
            f"| {load} ({units[load]}) | "
            + " | ".join(row)
            + f" | {ratio:.2f}x | >= {target}x {met} |"
        )
    print_cost_table(results, specs)


COSTS = {
    "round_trips_cpu": "CPU us per round trip",
    "downstream_cpu": "CPU s per GiB downstream",
    "upstream_cpu": "CPU s per GiB upstream",
}


def print_cost_table(results: dict[str, list[dict[str, float]]], specs: list[ProxySpec]) -> None:
    """The proxy tree's own CPU per unit over the same windows (lower is better)."""
    medians = {
        name: {k: statistics.median(r[k] for r in rounds) for k in COSTS}
        for name, rounds in results.items()
    }
    peer = medians[WEBSOCKIFY.name]
    print("\nThe proxy's own CPU (its process tree) over the same windows, medians:\n")
    print("| cost | " + " | ".join(spec.name for spec in specs) + " | --workers 2 / websockify |")
    print("|---" * (len(specs) + 2) + "|")
    for key, label in COSTS.items():
        digits = 0 if key == "round_trips_cpu" else 2
        row = [f"{medians[spec.name][key]:.{digits}f}" for spec in specs]
        ratio = medians[_with_workers(2).name][key] / peer[key]
        print(f"| {label} | " + " | ".join(row) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
