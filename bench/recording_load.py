"""``python -m bench.recording_load``: the recorder at a paced load, recording on against off.

The recorder's target: at 200 MiB/s of target data in total, as 20 sessions of 10 MiB/s
and as one session of 200 MiB/s, the recording keeps 100% of the bytes and the relay
keeps at least 0.8x the rate it has at that load without recording. Each scenario runs
with trio-bridge started fresh without ``--record`` and then with ``--record DIR``
(DIR in ``--recording-dir``, a real disk), alternating, ``--rounds`` times; one table
at the end, unrecorded figures beside recorded ones from the same run.

Each session's client asks the target (:mod:`bench.target`) for data on a schedule,
one 10 ms slice at a time and never more than two slices ahead of what it received, so
a relay that cannot keep up shows as a lower rate, not as a backlog. Kept bytes are
read back from the recordings (payload of every target->client data record, checksums
checked by the reader) after each run; the files are then deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import wire
from bench.procstat import cpu_layout, pin, priority, raise_fd_limit, tree_cpu_seconds
from bench.proxies import ROOT, TRIO_BRIDGE, RunningProxy, TargetProcess, frozen_source, recording
from bench.wsclient import FrameReader, binary_frame, open_session
from trio_bridge.observe import Direction
from trio_bridge.recording import FrameRecord, GapRecord, open_recording

MIB = 1 << 20
SLICE = 0.01  # seconds of data asked for at a time (bursts of at most two)
RECORDING_TIMEOUT = 120.0  # for the bridge to close its files after the sessions
SCENARIOS = {"20 x 10 MiB/s": (20, 10 * MIB), "1 x 200 MiB/s": (1, 200 * MIB)}


@dataclass
class Run:
    scenario: str
    recorded: bool
    offered: float  # bytes/s asked for, all sessions together
    relayed: float  # bytes/s received, all sessions together
    relayed_bytes: int
    proxy_cpu: float  # share of one core, until the recordings were closed
    kept_bytes: int | None = None
    gap_bytes: int | None = None

    @property
    def kept(self) -> float | None:
        return None if self.kept_bytes is None else self.kept_bytes / self.relayed_bytes


def paced_download(port: int, rate: int, duration: float, out: list[int], index: int) -> None:
    """One session receiving ``rate`` bytes/s for ``duration`` s; bytes received to ``out``."""
    step = max(64 << 10, int(rate * SLICE))
    with contextlib.closing(open_session(port, 30.0)) as sock:
        reader = FrameReader(sock, discard=True)
        start = time.perf_counter()
        sock.sendall(binary_frame(wire.down_start(step)))
        requested, received = step, 0
        while (elapsed := time.perf_counter() - start) < duration:
            due = int(rate * elapsed) + step
            if requested < due and requested - received < 2 * step:
                more = min(step, due - requested)
                sock.sendall(binary_frame(wire.down_more(more)))
                requested += more
            elif received < requested:
                received += reader.skip_frame()
            else:
                time.sleep(0.002)  # ahead of the schedule
        while received < requested:
            received += reader.skip_frame()
        out[index] = received


def recorded_bytes(folder: Path) -> tuple[int, int]:
    """Target->client data bytes kept in the recordings in ``folder``, and bytes the
    GAP records say are missing; the files are deleted."""
    kept = gaps = 0
    for path in folder.glob("*.tbrec"):
        with open_recording(path) as reader:
            for record in reader:
                if isinstance(record, FrameRecord):
                    if record.direction is Direction.DOWN and record.is_data:
                        kept += len(record.payload)
                elif isinstance(record, GapRecord):
                    gaps += record.bytes_down
        path.unlink()
    return kept, gaps


def measure(
    scenario: str,
    record_dir: Path | None,
    target: TargetProcess,
    args: argparse.Namespace,
    source_root: Path,
) -> Run:
    sessions, rate = SCENARIOS[scenario]
    spec = recording(TRIO_BRIDGE, record_dir) if record_dir is not None else TRIO_BRIDGE
    layout = cpu_layout() if args.pin else None
    log_path = ROOT / "bench" / "results" / "recording-load.log"
    cpus = layout[0] if layout else None
    with RunningProxy(spec, target.port, log_path, cpus, args.nice, source_root) as proxy:
        cpu = tree_cpu_seconds(proxy.pid)
        received = [0] * sessions
        threads = [
            threading.Thread(
                target=paced_download, args=(proxy.port, rate, args.duration, received, i)
            )
            for i in range(sessions)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        deadline = time.monotonic() + RECORDING_TIMEOUT
        if record_dir is not None:  # the writer's catching up counts as the relay's CPU
            while _open_files_in(proxy.pid, record_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
        cpu = tree_cpu_seconds(proxy.pid) - cpu
    run = Run(
        scenario,
        record_dir is not None,
        sessions * rate,
        sum(received) / seconds,
        sum(received),
        cpu / seconds,
    )
    if record_dir is not None:
        run.kept_bytes, run.gap_bytes = recorded_bytes(record_dir)
    return run


def _open_files_in(pid: int, folder: Path) -> bool:
    prefix = f"{folder.resolve()}/"
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if str(fd.readlink()).startswith(prefix):
                    return True
    return False


def table(runs: list[Run]) -> str:
    lines = [
        "| scenario | recording | offered MiB/s | relayed MiB/s (median) | on / off | "
        "proxy CPU (cores) | bytes kept (lowest) | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in SCENARIOS:
        off = [r for r in runs if r.scenario == scenario and not r.recorded]
        on = [r for r in runs if r.scenario == scenario and r.recorded]
        if not off or not on:
            continue
        off_rate, on_rate = _median([r.relayed for r in off]), _median([r.relayed for r in on])
        kept = min(r.kept or 0.0 for r in on)
        ratio = on_rate / off_rate
        met = (
            "met"
            if ratio >= 0.8 and all(r.kept_bytes == r.relayed_bytes for r in on)
            else "NOT met"
        )
        offered = off[0].offered / MIB
        lines.append(
            f"| {scenario} | off | {offered:.0f} | {off_rate / MIB:.1f} | | "
            f"{_median([r.proxy_cpu for r in off]):.2f} | | |"
        )
        lines.append(
            f"| {scenario} | on | {offered:.0f} | {on_rate / MIB:.1f} | {ratio:.2f}x | "
            f"{_median([r.proxy_cpu for r in on]):.2f} | {kept:.3%} | {met} |"
        )
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recording_load", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind (2)")
    parser.add_argument(
        "--recording-dir",
        default="/var/tmp",
        metavar="DIR",
        help="parent of the temporary recording folder: a real disk (/var/tmp)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place the processes (default: the bridge "
        "gets the last core, client and target the others)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value for bridge, client and target; on a shared machine (as root) "
        "e.g. -10 keeps other programs from disturbing the measurements",
    )
    parser.add_argument("--only", choices=sorted(SCENARIOS), help="one scenario only")
    args = parser.parse_args(argv)
    raise_fd_limit()
    layout = cpu_layout() if args.pin else None
    pin(layout[1] if layout else None)  # this process is the client
    runs: list[Run] = []
    scenarios = [args.only] if args.only else list(SCENARIOS)
    with (
        frozen_source("trio_bridge") as source_root,
        priority(args.nice),
        TargetProcess(layout[1] if layout else None, args.nice) as target,
        tempfile.TemporaryDirectory(prefix="bench-record-", dir=args.recording_dir) as folder,
    ):
        for round_no in range(1, args.rounds + 1):
            for scenario in scenarios:
                for record_dir in (None, Path(folder)):
                    run = measure(scenario, record_dir, target, args, source_root)
                    runs.append(run)
                    kept = "" if run.kept is None else f", kept {run.kept:.3%}"
                    mode = "on " if run.recorded else "off"
                    print(
                        f"round {round_no} {scenario:14} recording {mode}: "
                        f"{run.relayed / MIB:7.1f} MiB/s, proxy {run.proxy_cpu:.2f} cores{kept}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
