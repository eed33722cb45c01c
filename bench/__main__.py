"""``python -m bench`` (or ``./dev bench``): run the comparison and print the table.

Raw results go to bench/results/ as JSON (with the proxies' logs); ``--write-docs``
also rewrites docs/performance.md from this run's figures. ``--soak`` runs the soak
(:mod:`bench.soak`) instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procstat import raise_fd_limit
from bench.proxies import PROXIES, ROOT
from bench.report import disturbance, filesystem, machine, rows, text_table
from bench.runner import Options, run
from bench.soak import add_arguments as add_soak_arguments
from bench.soak import main as soak

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "performance.md"
QUICK = {
    "duration": 1.0,
    "rounds": 1,
    "round_trips": 1000,
    "idle_sessions": 200,
    "concurrent_sessions": 2000,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="trio-bridge against websockify 0.13, on loopback, with the same client.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run to check the harness: 1 round of 1 s, 200 idle and 2000 "
        "concurrent sessions (the figures are noisier and the 8,000 target is not checked)",
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per bulk run (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are medians (5)")
    parser.add_argument("--round-trips", type=int, default=5000, help="per round (5000)")
    parser.add_argument("--idle-sessions", type=int, default=1000, help="(1000)")
    parser.add_argument(
        "--concurrent-sessions", type=int, default=8000, help="trio-bridge only; 0 skips (8000)"
    )
    parser.add_argument(
        "--no-recording",
        dest="recording",
        action="store_false",
        help="skip trio-bridge's bulk runs with --record (recording on against off)",
    )
    parser.add_argument(
        "--recording-dir",
        default="/var/tmp",
        metavar="DIR",
        help="the --record runs write to a temporary folder in DIR, removed afterwards; "
        "it should be on a real disk, not a tmpfs (/var/tmp)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place the processes (default: the proxy gets the last "
        "core to itself, client and target share the others)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value for the proxy, client and target alike; on a shared machine "
        "(as root) e.g. -10 keeps other programs from disturbing the measurements",
    )
    parser.add_argument("--only", choices=sorted(PROXIES), help="measure one proxy only")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: print (and with --write-docs, document) a saved run",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"rewrite {DOCS.relative_to(ROOT)} from this run"
    )
    add_soak_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def git_commit() -> str:
    """The trio-bridge revision measured, marked ``+changes`` when the tree is dirty."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "trio_bridge"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}+changes" if dirty else head or "unknown"


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Run the benchmark; the raw results, with what was run where, saved as JSON."""
    raise_fd_limit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    options = Options(
        duration=args.duration,
        rounds=args.rounds,
        round_trips=args.round_trips,
        idle_sessions=args.idle_sessions,
        concurrent_sessions=args.concurrent_sessions,
        proxies=(args.only,) if args.only else tuple(PROXIES),
        log_dir=RESULTS / f"logs-{stamp}",
        pin=args.pin,
        nice=args.nice,
        recording=args.recording,
        recording_dir=Path(args.recording_dir),
    )
    commit = git_commit()  # before the run: the source is frozen as it starts
    started = time.monotonic()
    results = run(options)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["./dev bench", *(argv if argv is not None else sys.argv[1:])]),
        "elapsed_seconds": round(time.monotonic() - started),
        "options": {k: str(v) for k, v in vars(options).items()},
        "machine": machine(),
        "commit": commit,
        "recording_dir": f"{args.recording_dir} ({filesystem(args.recording_dir)})",
        "cpus": {
            "proxy": sorted(options.proxy_cpus or []),
            "client_and_target": sorted(options.load_cpus or []),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "results": results}
    saved = RESULTS / f"{stamp}.json"
    for path in (saved, RESULTS / "latest.json"):
        path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"raw results in {saved.relative_to(ROOT)}", file=sys.stderr)
    return document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.soak:
        return soak(args, argv, git_commit())
    if args.from_json:
        document = json.loads(Path(args.from_json).read_text())
    else:
        document = measure(args, argv)
    results = document["results"]
    table = rows(results)
    print()
    print(text_table(table))
    others = disturbance(results)
    if others > 0.15:
        print(f"\nwarning: other programs used up to {others:.0%} of a core during a measurement")
    print(f"\n{document['meta']['elapsed_seconds']} s of measurement")
    if args.write_docs:
        from bench.docs import write_performance_md

        write_performance_md(DOCS, document, table)
        print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
