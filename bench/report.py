"""From raw results to the comparison table, the targets, and docs/performance.md.

Each figure is the median over the rounds, so one disturbed round does not move it;
the ratio is trio-bridge / websockify, the way the targets are written, except in the
``--record`` rows: there it is trio-bridge with recording on / off.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

TRIO, WSFY = "trio-bridge", "websockify"


@dataclass(frozen=True)
class Row:
    metric: str
    trio: float | None
    wsfy: float | None
    fmt: str  # format of the two values
    target: str = ""
    met: bool | None = None  # None: no target for this row, or not measured
    versus: float | None = None  # the ratio's denominator when it is not websockify's value

    @property
    def ratio(self) -> float | None:
        base = self.wsfy if self.versus is None else self.versus
        if self.trio is None or not base:
            return None
        return self.trio / base

    def cells(self) -> list[str]:
        def value(v: float | None) -> str:
            return "-" if v is None else format(v, self.fmt)

        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        if self.ratio is not None and self.ratio < 0.1:
            ratio = f"{self.ratio:.2g}x"  # e.g. memory: 0.0047x, not 0.00x
        met = {None: "", True: "met", False: "NOT MET"}[self.met]
        return [self.metric, value(self.trio), value(self.wsfy), ratio, self.target, met]


def _median(rounds: list[dict[str, Any]], scenario: str, key: str) -> float | None:
    values = [r[scenario][key] for r in rounds if scenario in r]
    return statistics.median(values) if values else None


def _ratio_row(
    metric: str,
    trio: float | None,
    wsfy: float | None,
    fmt: str,
    target: str = "",
    test: Callable[[float], bool] | None = None,
    versus: float | None = None,
) -> Row:
    row = Row(metric, trio, wsfy, fmt, target, versus=versus)
    if test is not None and row.ratio is not None:
        row = Row(metric, trio, wsfy, fmt, target, test(row.ratio), versus)
    return row


def rows(results: dict[str, Any]) -> list[Row]:
    rounds = results["rounds"]

    def both(scenario: str, key: str) -> tuple[float | None, float | None]:
        return _median(rounds.get(TRIO, []), scenario, key), _median(
            rounds.get(WSFY, []), scenario, key
        )

    table = [
        _ratio_row(
            "downstream throughput (MiB/s)",
            *both("downstream", "mib_per_s"),
            ".0f",
            ">= 2x",
            lambda r: r >= 2,
        ),
        _ratio_row(
            "downstream proxy CPU (s/GiB)",
            *both("downstream", "cpu_s_per_gib"),
            ".2f",
            "<= 0.5x",
            lambda r: r <= 0.5,
        ),
        _ratio_row(
            "upstream throughput (MiB/s)",
            *both("upstream", "mib_per_s"),
            ".0f",
            ">= 3x",
            lambda r: r >= 3,
        ),
        _ratio_row("upstream proxy CPU (s/GiB)", *both("upstream", "cpu_s_per_gib"), ".2f"),
        _ratio_row(
            "64 B round trip p50 (us)",
            *both("round_trip", "p50_us"),
            ".0f",
            "<= 0.8x",
            lambda r: r <= 0.8,
        ),
        _ratio_row("64 B round trip p99 (us)", *both("round_trip", "p99_us"), ".0f"),
        _ratio_row("proxy CPU per round trip (us)", *both("round_trip", "cpu_us_per_rt"), ".0f"),
    ]
    table += _recording_rows(results.get("recording"), rounds.get(TRIO, []))
    idle = results["idle"]
    per_session = {
        name: idle[name]["pss_per_session"] / 1024
        for name in (TRIO, WSFY)
        if name in idle and "pss_per_session" in idle[name]
    }
    trio_idle = per_session.get(TRIO)
    if idle:
        sessions = next(iter(idle.values()))["sessions"]

        def opened(name: str) -> float | None:
            return idle[name]["opened"] if name in idle else None

        table.append(Row(f"idle sessions open (of {sessions})", opened(TRIO), opened(WSFY), "d"))
        table.append(
            Row(
                "PSS per idle session (KiB)",
                trio_idle,
                per_session.get(WSFY),
                ".1f",
                "trio <= 32 KiB",
                None if trio_idle is None else trio_idle <= 32,
            )
        )
    concurrent = results.get("concurrent")
    if concurrent:
        wanted = concurrent["sessions"]
        table.append(
            Row(
                "concurrent sessions relaying (one process)",
                concurrent["opened"],
                None,
                "d",
                f"{wanted} of {wanted}" if wanted >= 8000 else "8000 (not run)",
                concurrent["opened"] == wanted if wanted >= 8000 else None,
            )
        )
        if "pss" in concurrent:
            table.append(
                Row(
                    f"  PSS with {wanted} sessions (MiB)",
                    concurrent["pss"] / (1 << 20),
                    None,
                    ".1f",
                )
            )
    return table


def _recording_rows(on: list[dict[str, Any]] | None, off: list[dict[str, Any]]) -> list[Row]:
    """trio-bridge with ``--record DIR``, against its own bulk figures without it (same
    rounds): the ratio column is on / off, for information.

    Unpaced, a bulk session outruns what the disk takes, so the recording drops (and
    marks) what the session's buffer cannot hold: the share of the relayed bytes each
    recording kept is printed beside the ratio. The recorder's target (everything kept,
    the relay at >= 0.8x, at 200 MiB/s) is measured at a paced load by
    :mod:`bench.recording_load`.
    """
    if not on:
        return []
    table = []
    for scenario in ("downstream", "upstream"):
        share = min(r[scenario]["recorded_share"] for r in on)
        table += [
            _ratio_row(
                f"{scenario} throughput, --record (MiB/s)",
                _median(on, scenario, "mib_per_s"),
                None,
                ".0f",
                versus=_median(off, scenario, "mib_per_s"),
            ),
            Row(f"  {scenario} bytes in the recording (lowest)", share, None, ".1%"),
            _ratio_row(
                f"{scenario} proxy CPU, --record (s/GiB)",
                _median(on, scenario, "cpu_s_per_gib"),
                None,
                ".2f",
                versus=_median(off, scenario, "cpu_s_per_gib"),
            ),
        ]
    return table


HEADER = ["metric", TRIO, WSFY, "ratio", "target", "met?"]


def text_table(table: list[Row]) -> str:
    lines = [HEADER, *(row.cells() for row in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(table: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in table]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, str]:
    versions = {}
    for package in ("trio-bridge", "trio", "websockets", "websockify", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
    }


def disturbance(results: dict[str, Any]) -> float:
    """The largest share of a core that other programs took during a measurement."""
    shares = [
        r[scenario]["busy"]["others"]
        for rounds in (*results["rounds"].values(), results.get("recording") or [])
        for r in rounds
        for scenario in ("downstream", "upstream", "round_trip")
        if scenario in r
    ]
    return max(shares, default=0.0)


def filesystem(path: str) -> str:
    """``path``'s file system type and device, from /proc/mounts (e.g. "ext4 on /dev/vda"):
    recordings on a tmpfs would measure memory, not a disk."""
    real, best = os.path.realpath(path), ("", "unknown file system")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, kind = line.split()[:3]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, f"{kind} on {device}")
    except OSError:
        pass
    return best[1]
