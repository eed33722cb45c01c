"""The ``trio-bridge`` command line: websockify's positional form, one frozen Config out.

    trio-bridge [options] [source_host:]source_port target_host:target_port
    trio-bridge [options] [source_host:]source_port --unix-target PATH
    trio-bridge [options] --unix-listen PATH target_host:target_port

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the bridge cannot
start (e.g. the port is taken), 2 for bad arguments, with a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import NoReturn

import trio

from . import __version__
from .config import (
    DEFAULT_LISTEN_HOST,
    Address,
    Config,
    ConfigError,
    Limits,
    StartupError,
    UnixAddress,
    parse_host_port,
)
from .server import Bridge

log = logging.getLogger("trio_bridge")

SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_size(text: str) -> int:
    number, suffix = text[:-1], text[-1:].lower()
    if suffix not in SIZE_SUFFIXES or suffix == "":
        number, suffix = text, ""
    try:
        value = int(number) * SIZE_SUFFIXES[suffix]
    except ValueError:
        example = "e.g. 1048576, 64k, 16m"
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({example})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def parse_mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode") from None


def build_parser() -> OneLineParser:
    defaults = Limits()
    parser = OneLineParser(
        prog="trio-bridge",
        description=(
            "Relay WebSocket clients (noVNC, xterm.js, ...) to one TCP or Unix-socket "
            "target. Listens on 127.0.0.1 unless a host is given."
        ),
        epilog="Options map to websockify's: see docs/websockify-options.md.",
    )
    parser.add_argument(
        "endpoints",
        nargs="*",
        metavar="[source_host:]source_port target_host:target_port",
        help="where to listen (default host 127.0.0.1; [::] or 0.0.0.0 for all) and the target",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each session opening")
    parser.add_argument(
        "--traffic", action="store_true", help="log byte counts of every session every 10 s"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = parser.add_argument_group("sockets")
    where.add_argument("--unix-target", metavar="PATH", help="relay to a Unix socket")
    where.add_argument("--unix-listen", metavar="PATH", help="listen on a Unix socket")
    where.add_argument(
        "--unix-listen-mode", metavar="MODE", type=parse_mode, help="octal mode of that socket"
    )
    ws = parser.add_argument_group("WebSocket")
    ws.add_argument(
        "--compression",
        action="store_true",
        help="offer permessage-deflate to clients that ask (costs CPU; off by default)",
    )
    ws.add_argument(
        "--max-message-size",
        type=parse_size,
        default=defaults.max_message_size,
        metavar="BYTES",
        help="close with 1009 when a client message is larger (default: 1m)",
    )
    ws.add_argument(
        "--no-zero-copy",
        dest="zero_copy",
        action="store_false",
        help="frame target data in Python instead of splice(2) (for debugging)",
    )
    timing = parser.add_argument_group("time limits (seconds)")
    timing.add_argument(
        "--heartbeat", type=parse_seconds, metavar="S", help="ping clients every S seconds"
    )
    timing.add_argument(
        "--idle-timeout", type=parse_seconds, metavar="S", help="close sessions idle for S"
    )
    timing.add_argument(
        "--timeout",
        dest="session_timeout",
        type=parse_seconds,
        metavar="S",
        help="close sessions older than S (websockify's --timeout differs: see docs)",
    )
    for name, default, text in (
        ("handshake-timeout", defaults.handshake_timeout, "to complete the opening handshake"),
        ("connect-timeout", defaults.connect_timeout, "to connect to the target"),
        ("close-timeout", defaults.close_timeout, "for the client to answer a close frame"),
        ("shutdown-grace", defaults.shutdown_grace, "for sessions to end on SIGTERM"),
    ):
        timing.add_argument(
            f"--{name}",
            type=parse_seconds,
            default=default,
            metavar="S",
            help=f"time {text} (default: {default:g})",
        )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"answer 503 beyond N open connections (default: {defaults.max_connections})",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    endpoints: list[str] = list(args.endpoints)
    wanted = 2 - (args.unix_target is not None) - (args.unix_listen is not None)
    if len(endpoints) != wanted:
        shapes = {
            2: "[source_host:]source_port target_host:target_port",
            1: "one address: "
            + ("[source_host:]source_port" if args.unix_target else "target_host:target_port"),
            0: "no positional address with both --unix-listen and --unix-target",
        }
        raise ConfigError(f"expected {shapes[wanted]}, got {len(endpoints)} argument(s)")
    listen: Address
    if args.unix_listen is not None:
        listen = UnixAddress(args.unix_listen)
    else:
        listen = parse_host_port(endpoints.pop(0), "source", default_host=DEFAULT_LISTEN_HOST)
    target: Address
    if args.unix_target is not None:
        target = UnixAddress(args.unix_target)
    else:
        target = parse_host_port(endpoints.pop(0), "target")
    limits = Limits(
        handshake_timeout=args.handshake_timeout,
        connect_timeout=args.connect_timeout,
        close_timeout=args.close_timeout,
        idle_timeout=args.idle_timeout,
        session_timeout=args.session_timeout,
        heartbeat=args.heartbeat,
        max_message_size=args.max_message_size,
        max_connections=args.max_connections,
        shutdown_grace=args.shutdown_grace,
    )
    return Config(
        target=target,
        listen=listen,
        unix_listen_mode=args.unix_listen_mode,
        limits=limits,
        compression=args.compression,
        traffic=args.traffic,
        zero_copy=args.zero_copy,
    )


async def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bridge: Bridge = await nursery.start(Bridge(config).serve)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                bridge.request_shutdown()
                break


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every handshake at INFO; the bridge logs its own summary.
    logging.getLogger("trio_bridge.websocket").setLevel(logging.WARNING)


def _leaves(group: BaseExceptionGroup[StartupError]) -> list[StartupError]:
    leaves: list[StartupError] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(args.verbose)
    failures: list[StartupError] = []
    try:
        trio.run(run, config)
    except* StartupError as group:
        # Errors before "serving" arrive wrapped in the nursery's ExceptionGroup.
        failures = _leaves(group)
    for failure in failures:
        print(f"trio-bridge: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
