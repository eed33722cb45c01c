"""The ``trio-bridge-replay`` command line (docs/replay.md).

    trio-bridge-replay [show] FILE [--full | --no-payload] [--filter up|down] [--strict]
    trio-bridge-replay serve FILE [--listen [HOST:]PORT] [--speed X] [--no-delay]
                             [--lockstep [--lockstep-timeout S]] [--once] [--web DIR]
    trio-bridge-replay drive FILE (--target HOST:PORT | --url ws://...) [--speed X]
                             [--no-delay] [--timeout S] [--compare MODE] [--images DIR]
    trio-bridge-replay export [--format websockify] FILE [-o OUT]

Exit status, as diff(1): 0 the recording reads completely / the live side matched;
1 it did not (file cut or damaged, client or server different); 2 trouble (usage, a
file that is not a recording, a server that cannot be reached); 130 interrupted
(Ctrl-C, SIGINT), as shells report it. Every error is one line on stderr, never a
traceback; an interrupt prints nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO, TypeVar

import trio

from .. import __version__
from ..arguments import OneLineParser, positive_number
from ..config import ConfigError, TcpAddress, parse_host_port
from ..observe import Direction
from ..recording import GapRecord, RecordingError, open_recording
from .drive import DriveReport, drive, make_comparator
from .export import export_websockify
from .messages import describe_gap
from .progress import Progress
from .serve import ReplayServer, ServeReport
from .timeline import PayloadView, Summary, print_timeline

PROG = "trio-bridge-replay"
USAGE = """
  %(prog)s [show] FILE [--full | --no-payload] [--filter up|down] [--strict]
  %(prog)s serve FILE [--listen [HOST:]PORT] [--speed X] [--no-delay] [--lockstep] [--once]
        [--lockstep-timeout S] [--web DIR]
  %(prog)s drive FILE (--target HOST:PORT | --url ws://...) [--speed X] [--no-delay]
        [--timeout S] [--compare bytes|messages|lengths|none|rfb|MODULE:NAME] [--images DIR]
  %(prog)s export [--format websockify] FILE [-o OUT]"""
COMMANDS = ("show", "serve", "drive", "export")
SAME, DIFFERENT, TROUBLE = 0, 1, 2
INTERRUPTED = 130  # 128 + SIGINT
FILE_HELP = "a recording made by trio-bridge --record (*.tbrec)"


class Trouble(Exception):
    """Ends the program with status 2 and this one-line message."""


_speed = positive_number("a number")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        usage=USAGE,
        description="Show, replay and export trio-bridge session recordings.",
        epilog="Without a command, FILE is shown as a timeline. See docs/replay.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    show = commands.add_parser(
        "show", prog=f"{PROG} show", help="print the session as a timeline (the default)"
    )
    show.add_argument("file", type=Path, metavar="FILE", help=FILE_HELP)
    view = show.add_mutually_exclusive_group()
    view.add_argument("--full", action="store_true", help="every payload in full")
    view.add_argument("--no-payload", action="store_true", help="no payload previews")
    show.add_argument(
        "--filter", choices=["up", "down"], help="only frames client->target (up) or back (down)"
    )
    show.add_argument(
        "--strict", action="store_true", help="exit 1 when the recording has gaps (lost frames)"
    )

    def pacing(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--speed", type=_speed, default=1.0, metavar="X", help="play X times faster"
        )
        sub.add_argument("--no-delay", action="store_true", help="ignore the recorded timing")

    serve = commands.add_parser(
        "serve", prog=f"{PROG} serve", help="play the target's side to WebSocket clients"
    )
    serve.add_argument("file", type=Path, metavar="FILE", help=FILE_HELP)
    serve.add_argument(
        "--listen", default="127.0.0.1:6080", metavar="[HOST:]PORT", help="default 127.0.0.1:6080"
    )
    pacing(serve)
    serve.add_argument(
        "--lockstep",
        action="store_true",
        help="wait for each recorded client message before moving on",
    )
    serve.add_argument(
        "--web",
        type=Path,
        metavar="DIR",
        help="also serve DIR (noVNC: /usr/share/novnc) and a page with pause and speed",
    )
    serve.add_argument(
        "--lockstep-timeout",
        type=_speed,
        default=30.0,
        metavar="S",
        help="longest lockstep wait for a client message, then play on (default 30)",
    )
    serve.add_argument(
        "--once",
        action="store_true",
        help="serve one client (a completed handshake), exit 0 if it matched, 1 if not",
    )

    drive_cmd = commands.add_parser(
        "drive", prog=f"{PROG} drive", help="play the client's side against a server"
    )
    drive_cmd.add_argument("file", type=Path, metavar="FILE", help=FILE_HELP)
    where = drive_cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="HOST:PORT", help="the TCP service itself")
    where.add_argument("--url", metavar="ws://...", help="a WebSocket server or bridge")
    pacing(drive_cmd)
    drive_cmd.add_argument(
        "--timeout",
        type=_speed,
        default=10.0,
        metavar="S",
        help="longest wait for the server's answer or close (default 10)",
    )
    drive_cmd.add_argument(
        "--compare",
        default="bytes",
        metavar="MODE",
        help="bytes (default), messages, lengths, none, rfb (VNC screens), or MODULE:NAME",
    )
    drive_cmd.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="rfb: write expected/actual/diff PNG images of differing screens to DIR",
    )

    export = commands.add_parser(
        "export", prog=f"{PROG} export", help="convert to another recording format"
    )
    export.add_argument("file", type=Path, metavar="FILE", help=FILE_HELP)
    export.add_argument(
        "--format", choices=["websockify"], default="websockify", help="the only one, the default"
    )
    export.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    return parser


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


T = TypeVar("T")


def run_interruptible(function: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(function)``, with SIGINT cancelling it and then raising a bare
    :class:`KeyboardInterrupt`.

    Left to Trio, SIGINT raises KeyboardInterrupt inside whichever task runs, and every
    nursery on its way out wraps it in a BaseExceptionGroup, which ``except
    KeyboardInterrupt`` never matches: a traceback and status 1. Received as a signal,
    it cancels the command, which cleans up (sockets, a half-written report) as on any
    cancellation. ``function``'s own errors are raised as they are, not in a group.
    """
    results: list[T] = []
    errors: list[Exception] = []
    interrupted = False

    async def until_interrupted() -> None:
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:

                async def cancel_on_interrupt() -> None:
                    nonlocal interrupted
                    async for _ in interrupts:
                        interrupted = True
                        nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_on_interrupt)
                try:
                    results.append(await function())
                except Exception as exc:  # the nursery would wrap it in a group
                    errors.append(exc)
                nursery.cancel_scope.cancel()

    trio.run(until_interrupted)
    if interrupted:
        raise KeyboardInterrupt
    if errors:
        raise errors[0]
    return results[0]


# -- commands ---------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    view = PayloadView.FULL if args.full else PayloadView.PREVIEW
    if args.no_payload:
        view = PayloadView.NONE
    only = {"up": Direction.UP, "down": Direction.DOWN}.get(args.filter or "")
    # The timeline itself shows progress on a terminal; a bar only helps when it goes elsewhere.
    progress = Progress(f"reading {args.file}", _file_size(args.file))
    progress.enabled = progress.enabled and not sys.stdout.isatty()
    summary = Summary()
    with open_recording(args.file) as reader:
        try:
            status = print_timeline(
                reader,
                sys.stdout,
                view=view,
                only=only,
                on_progress=progress.update,
                summary=summary,
            )
        finally:
            progress.finish()
    if not status.complete:
        print(f"{PROG}: {args.file}: {status.describe()}", file=sys.stderr)
        return DIFFERENT
    if args.strict and summary.gaps:
        print(f"{PROG}: {args.file}: {_gaps(summary.gaps)} (--strict)", file=sys.stderr)
        return DIFFERENT
    return SAME


def _gaps(count: int) -> str:
    return f"the recording has {count} gap{'s' if count != 1 else ''} (frames were lost)"


def cmd_export(args: argparse.Namespace) -> int:
    progress = Progress(f"exporting {args.file}", _file_size(args.file))
    gaps: list[GapRecord] = []
    with open_recording(args.file) as reader:
        out: TextIO
        with _Output(args.output) as out:
            try:
                count = export_websockify(
                    reader, out, on_progress=progress.update, on_gap=gaps.append
                )
            finally:
                progress.finish()
    assert reader.status is not None
    print(f"{PROG}: exported {count} messages", file=sys.stderr)
    for gap in gaps:
        print(f"{PROG}: {args.file}: note: {describe_gap(gap)}", file=sys.stderr)
    if not reader.status.complete:
        print(f"{PROG}: {args.file}: {reader.status.describe()}", file=sys.stderr)
        return DIFFERENT
    return SAME


class _Output:
    """stdout, or a file written under a temporary name and renamed when complete."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._temp = path.with_name(f".{path.name}.part") if path is not None else None
        self._file: TextIO | None = None

    def __enter__(self) -> TextIO:
        if self._temp is None:
            return sys.stdout
        self._file = open(self._temp, "w", encoding="ascii")
        return self._file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._file is None or self._temp is None or self.path is None:
            return
        self._file.close()
        if exc_type is None:
            os.replace(self._temp, self.path)
        else:
            self._temp.unlink(missing_ok=True)


def _progress_callback(progress: Progress) -> Callable[[int, float], None]:
    def update(position: int, seconds: float) -> None:
        progress.update(position, f"{seconds:.1f} s played")

    return update


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        listen = parse_host_port(args.listen, "--listen", default_host="127.0.0.1")
    except ConfigError as exc:
        raise Trouble(str(exc)) from None
    if args.web is not None and not (args.web / "vnc.html").is_file():
        raise Trouble(f"--web {args.web}: no vnc.html there (noVNC: /usr/share/novnc)")
    progress = Progress(f"replaying {args.file}", _file_size(args.file))

    def report(result: ServeReport) -> None:
        progress.finish()
        for line in result.lines():
            print(line, flush=True)

    def waiting(client: str, what: str) -> None:
        progress.finish()
        print(f"{PROG}: client {client}: {what}", file=sys.stderr, flush=True)

    server = ReplayServer(
        args.file,
        speed=args.speed,
        delay=not args.no_delay,
        lockstep=args.lockstep,
        lockstep_timeout=args.lockstep_timeout,
        on_wait=waiting,
        web=args.web,
        on_report=report,
        on_progress=lambda client, position, seconds: progress.update(
            position, f"{client}, {seconds:.1f} s"
        ),
    )
    meta = server.meta

    async def run() -> None:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        bound = TcpAddress(listen.host, listeners[0].socket.getsockname()[1])
        print(
            f"serving session {meta.session_id} ({meta.client} -> {meta.target}) on ws://{bound}/",
            flush=True,
        )
        if args.web is not None:
            print(f"open http://{bound}/replay.html", flush=True)
        await server.serve_listeners(listeners, once=args.once)

    try:
        run_interruptible(run)
    except OSError as exc:
        raise Trouble(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    if args.once:
        return SAME if server.reports and server.reports[0].ok else DIFFERENT
    return SAME


def cmd_drive(args: argparse.Namespace) -> int:
    target = None
    if args.target is not None:
        try:
            target = parse_host_port(args.target, "--target")
        except ConfigError as exc:
            raise Trouble(str(exc)) from None
    try:
        comparator = make_comparator(args.compare)
    except (ValueError, ImportError, AttributeError) as exc:
        raise Trouble(f"--compare: {exc}") from None
    if args.images is not None:
        if not hasattr(comparator, "images"):
            raise Trouble("--images needs --compare rfb")
        comparator.images = args.images
    progress = Progress(f"driving {args.file}", _file_size(args.file))
    try:
        report: DriveReport = run_interruptible(
            lambda: drive(
                args.file,
                target=target,
                url=args.url,
                speed=args.speed,
                delay=not args.no_delay,
                timeout=args.timeout,
                compare=comparator,
                on_progress=_progress_callback(progress),
            )
        )
    finally:
        progress.finish()
    if report.error:  # one line on stderr, nothing on stdout
        raise Trouble(report.error)
    for line in report.lines():
        print(line)
    return SAME if report.ok else DIFFERENT


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": cmd_show,
    "serve": cmd_serve,
    "drive": cmd_drive,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        return TROUBLE
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "show")  # trio-bridge-replay FILE
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except (RecordingError, Trouble) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # e.g. | head: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return SAME
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:  # show and export run no event loop: it arrives as raised
        return INTERRUPTED
    return TROUBLE


if __name__ == "__main__":
    sys.exit(main())
