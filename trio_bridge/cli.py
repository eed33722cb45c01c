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
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .activation import InheritedSockets, Role, inherited_sockets
from .addons import Addons, WrappedProgramExited
from .addresses import DEFAULT_LISTEN_HOST, Address, UnixAddress, parse_host_port
from .arguments import OneLineParser, positive_number
from .config import (
    FORWARDED_HEADERS,
    TLS_VERSIONS,
    TOKEN_FROM,
    AuthSettings,
    Config,
    Limits,
    ServiceConfig,
    TargetTlsSettings,
    TlsSettings,
    TokenSettings,
    WrapConfig,
    WrapMode,
)
from .errors import ConfigError, StartupError
from .logs import EscapeControlCharacters
from .service import run
from .systemd import LOG_DESTINATIONS, log_handler
from .version import __version__
from .workers import (
    limiter_from_main,
    run_worker,
    serve_with_workers,
    sockets_from_main,
    worker_count,
)
from .wrap import split_command

log = logging.getLogger("trio_bridge")

SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


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


parse_seconds = positive_number("a number of seconds")


def parse_seconds_or_off(text: str) -> float | None:
    """Seconds, or 0 for "off"."""
    return None if text.strip() in ("0", "0.0") else parse_seconds(text)


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
    parser.add_argument(
        "--log",
        choices=LOG_DESTINATIONS,
        default="auto",
        help="where log lines go; auto: the journal when stderr is connected to it "
        "(under systemd), else stderr (default: auto)",
    )
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
        "--heartbeat",
        type=parse_seconds_or_off,
        default=defaults.heartbeat,
        metavar="S",
        help="ping clients every S seconds; no pong within S closes the session "
        f"(default: {defaults.heartbeat:g}; 0 turns it off)",
    )
    timing.add_argument(
        "--idle-timeout",
        type=parse_seconds_or_off,
        metavar="S",
        help="close sessions with no data either way for S (default: off)",
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
    parser.add_argument(
        "--max-handshakes",
        type=int,
        default=defaults.max_handshakes,
        metavar="N",
        help="at most N connections in their opening handshake; a new one closes the "
        f"oldest (default: {defaults.max_handshakes})",
    )
    add_web_wrap_metrics_arguments(parser)
    parser.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="record every session to its own file in DIR (e.g. . under systemd: the "
        "state directory); see docs/recording-format.md",
    )
    parser.add_argument(
        "--record-priority",
        choices=("relay", "recording"),
        help="deprecated, no effect: recordings keep everything the disk takes",
    )
    _add_security_arguments(parser, defaults)
    _add_proxy_arguments(parser)
    return parser


def add_web_wrap_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """docs/web.md, docs/wrap-mode.md, docs/metrics.md."""
    web = parser.add_argument_group("files and health (plain HTTP on the same port)")
    web.add_argument("--web", metavar="DIR", help="serve the files in DIR (e.g. /usr/share/novnc)")
    web.add_argument(
        "--web-listing", action="store_true", help="list folders that have no index.html"
    )
    web.add_argument(
        "--web-auth", action="store_true", help="apply the auth plugin to file requests too"
    )
    web.add_argument(
        "--file-only", action="store_true", help="serve files only: no target, no relay"
    )
    web.add_argument(
        "--health-path",
        default="/healthz",
        metavar="PATH",
        help="health endpoint for load balancers (default: /healthz; '' turns it off)",
    )
    wrap = parser.add_argument_group(
        "wrap mode: trio-bridge [options] SOURCE [TARGET] -- PROGRAM ARGS"
    )
    wrap.add_argument(
        "--wrap-mode",
        choices=[mode.value for mode in WrapMode],
        help="when the program exits: ignore it, exit too, or respawn it (default: exit)",
    )
    wrap.add_argument(
        "--wrap-stdio",
        action="store_true",
        help="relay to the program's stdin/stdout instead of a port it listens on",
    )
    parser.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default host 127.0.0.1)",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="N processes accepting on the same sockets; auto: one per CPU (default: 1)",
    )
    parser.set_defaults(wrap_command=[])


def _workers(text: str) -> int:
    try:
        return worker_count(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 1 or auto") from None


def _add_security_arguments(parser: argparse.ArgumentParser, defaults: Limits) -> None:
    """TLS, token routing, authentication, per-address limits (docs/security.md)."""
    tls = parser.add_argument_group("TLS (wss:// and ws:// on the same port)")
    tls.add_argument("--cert", metavar="FILE", help="PEM certificate chain: turns on wss://")
    tls.add_argument("--key", metavar="FILE", help="PEM private key, if not in --cert")
    tls.add_argument(
        "--key-password",
        metavar="SOURCE",
        help="an encrypted key's password from file:PATH, env:NAME or credential:NAME "
        "(systemd's LoadCredential=); never the password itself",
    )
    tls.add_argument("--ssl-only", action="store_true", help="refuse plain ws:// with HTTP 400")
    tls.add_argument(
        "--ssl-minimum-version",
        "--ssl-version",
        choices=list(TLS_VERSIONS),
        default="1.2",
        help="lowest TLS version accepted (default: 1.2)",
    )
    tls.add_argument("--ssl-ciphers", metavar="LIST", help="OpenSSL cipher list for TLS 1.2")
    tls.add_argument(
        "--verify-client", action="store_true", help="require a client certificate (see --cafile)"
    )
    tls.add_argument("--cafile", metavar="FILE", help="CAs that client certificates must chain to")
    tls.add_argument("--ssl-target", action="store_true", help="connect to targets over TLS")
    tls.add_argument("--ssl-target-cafile", metavar="FILE", help="target CAs (default: system)")
    tls.add_argument(
        "--ssl-target-server-name", metavar="NAME", help="name the target certificate must carry"
    )
    tls.add_argument(
        "--ssl-target-no-verify",
        action="store_true",
        help="accept any target certificate (self-signed; insecure)",
    )
    tokens = parser.add_argument_group("token routing (one bridge, many targets)")
    tokens.add_argument(
        "--token-plugin",
        metavar="NAME",
        help="TokenFile, ReadOnlyTokenFile, TokenFileName, TokenRedis, JWTTokenApi, "
        "UnixDomainSocketDirectory, BaseTokenAPI, JSONTokenApi, or module.Class "
        "(docs/plugins.md); replaces the target",
    )
    tokens.add_argument("--token-source", metavar="ARG", help="the plugin's file, directory, ...")
    tokens.add_argument(
        "--token-from",
        choices=TOKEN_FROM,
        help="read the token from ?token= (default), the last path segment, or Host",
    )
    tokens.add_argument("--host-token", action="store_true", help="same as --token-from host")
    tokens.add_argument(
        "--target-config", metavar="FILE", help="websockify's older spelling of TokenFile FILE"
    )
    tokens.add_argument(
        "--jwt-audience", metavar="AUD", help="JWTTokenApi: tokens must carry this 'aud' claim"
    )
    tokens.add_argument(
        "--jwt-issuer", metavar="ISS", help="JWTTokenApi: tokens must carry this 'iss' claim"
    )
    tokens.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only these targets, e.g. 10.0.0.0/24:5900-5999, *.vnc.lan:5900, unix:/run/*",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--auth-plugin", metavar="NAME", help="BasicHTTPAuth, ExpectOrigin, ClientCertCNAuth"
    )
    auth.add_argument("--auth-source", metavar="ARG", help="the plugin's argument")
    auth.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="accept browsers only from this origin (repeatable), e.g. https://vnc.example.com",
    )
    abuse = parser.add_argument_group("per-address limits (0 turns one off)")
    abuse.add_argument(
        "--max-connections-per-address",
        type=int,
        default=defaults.max_connections_per_address,
        metavar="N",
        help="answer 429 beyond N open connections from one address "
        f"(default: {defaults.max_connections_per_address})",
    )
    abuse.add_argument(
        "--connection-rate",
        type=float,
        default=defaults.connection_rate,
        metavar="R",
        help=f"new connections per second per address (default: {defaults.connection_rate:g})",
    )
    abuse.add_argument(
        "--connection-burst",
        type=int,
        default=defaults.connection_burst,
        metavar="N",
        help=f"above the rate, in a burst (default: {defaults.connection_burst})",
    )
    abuse.add_argument(
        "--limit-exempt",
        action="append",
        metavar="CIDR",
        help="addresses not limited (repeatable; default: loopback, e.g. a reverse proxy; "
        "'none' limits every address)",
    )


def _add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Behind a load balancer: who the client really is (docs/scaling.md)."""
    proxies = parser.add_argument_group("behind a load balancer (docs/scaling.md)")
    proxies.add_argument(
        "--proxy-protocol",
        action="append",
        default=[],
        metavar="CIDR[,CIDR]",
        help="connections from these networks must start with a PROXY protocol header "
        "(v1 or v2, e.g. HAProxy's send-proxy-v2); it is refused from anywhere else",
    )
    proxies.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR[,CIDR]",
        help="reverse proxies whose forwarding header names the client (repeatable); "
        "both options also take uid:N, a proxy on --unix-listen",
    )
    proxies.add_argument(
        "--forwarded-header",
        choices=FORWARDED_HEADERS,
        help="the header --trusted-proxy proxies write (default: x-forwarded-for)",
    )


def _proxy_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields of :func:`_add_proxy_arguments`' options (comma lists split)."""
    if args.forwarded_header and not args.trusted_proxy:
        raise ConfigError("--forwarded-header needs --trusted-proxy")

    def networks(values: list[str]) -> tuple[str, ...]:
        return tuple(part.strip() for value in values for part in value.split(",") if part.strip())

    return {
        "proxy_protocol": networks(args.proxy_protocol),
        "trusted_proxies": networks(args.trusted_proxy),
        "forwarded_header": args.forwarded_header or "x-forwarded-for",
    }


def _security_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields of :func:`_add_security_arguments`' options."""
    needs_cert = [
        flag
        for flag, value in (
            ("--key", args.key),
            ("--key-password", args.key_password),
            ("--ssl-only", args.ssl_only),
            ("--verify-client", args.verify_client),
            ("--cafile", args.cafile),
            ("--ssl-ciphers", args.ssl_ciphers),
        )
        if value
    ]
    if needs_cert and not args.cert:
        raise ConfigError(f"{', '.join(needs_cert)}: only with --cert")
    target_flags = (args.ssl_target_cafile, args.ssl_target_server_name, args.ssl_target_no_verify)
    if any(target_flags) and not args.ssl_target:
        raise ConfigError("--ssl-target-* options need --ssl-target")
    for flag, value, plugin, needed in (
        ("--token-source", args.token_source, args.token_plugin, "--token-plugin"),
        ("--host-token", args.host_token, args.token_plugin, "--token-plugin"),
        ("--token-from", args.token_from, args.token_plugin, "--token-plugin"),
        ("--jwt-audience", args.jwt_audience, args.token_plugin, "--token-plugin JWTTokenApi"),
        ("--jwt-issuer", args.jwt_issuer, args.token_plugin, "--token-plugin JWTTokenApi"),
        ("--auth-source", args.auth_source, args.auth_plugin, "--auth-plugin"),
    ):
        if value and not plugin:
            raise ConfigError(f"{flag} needs {needed}")
    fields: dict[str, Any] = {
        "tls": TlsSettings(
            cert=args.cert,
            key=args.key,
            ssl_only=args.ssl_only,
            minimum_version=args.ssl_minimum_version,
            ciphers=args.ssl_ciphers,
            verify_client=args.verify_client,
            cafile=args.cafile,
            key_password=args.key_password,
        )
        if args.cert
        else None,
        "target_tls": TargetTlsSettings(
            cafile=args.ssl_target_cafile,
            server_name=args.ssl_target_server_name,
            verify=not args.ssl_target_no_verify,
        )
        if args.ssl_target
        else None,
        "tokens": TokenSettings(
            args.token_plugin,
            args.token_source,
            "host" if args.host_token else args.token_from or "query",
            jwt_audience=args.jwt_audience,
            jwt_issuer=args.jwt_issuer,
        )
        if args.token_plugin
        else None,
        "allow_targets": tuple(args.allow_target),
        "auth": (AuthSettings(args.auth_plugin, args.auth_source),) if args.auth_plugin else (),
        "allow_origins": tuple(args.allow_origin),
    }
    if args.limit_exempt is not None:
        fields["limit_exempt"] = tuple(cidr for cidr in args.limit_exempt if cidr != "none")
    return fields


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        handshake_timeout=args.handshake_timeout,
        connect_timeout=args.connect_timeout,
        close_timeout=args.close_timeout,
        idle_timeout=args.idle_timeout,
        session_timeout=args.session_timeout,
        heartbeat=args.heartbeat,
        max_message_size=args.max_message_size,
        max_connections=args.max_connections,
        max_handshakes=args.max_handshakes,
        shutdown_grace=args.shutdown_grace,
        max_connections_per_address=args.max_connections_per_address or None,
        connection_rate=args.connection_rate or None,
        connection_burst=args.connection_burst,
    )


def _positional_shape(args: argparse.Namespace, sockets_inherited: bool) -> tuple[bool, bool]:
    """Which of (listen address, target) the positional arguments hold.

    websockify's form is ``[source_host:]source_port target_host:target_port``; a
    --unix-listen or --unix-target takes the place of one. No target is given with
    token routing, --file-only, or a wrapped program on a port the bridge picks; no
    listen address when systemd passed the listening sockets.
    """
    endpoints: list[str] = args.endpoints
    by_token = args.token_plugin is not None  # the token names the target (docs/security.md)
    if by_token and args.unix_target is not None:
        raise ConfigError("--token-plugin routes each client by its token: drop --unix-target")
    command: list[str] = args.wrap_command
    if not command and (args.wrap_mode or args.wrap_stdio):
        raise ConfigError("--wrap-mode and --wrap-stdio need a program: ... -- PROGRAM ARGS")
    wanted = 2 - (args.unix_target is not None) - (args.unix_listen is not None)
    untargeted = by_token or args.file_only or bool(command and len(endpoints) == wanted - 1)
    if command and sockets_inherited and args.unix_listen is None and len(endpoints) == wanted - 2:
        untargeted = True  # no listen address (inherited) and no target (the program's port)
    wanted -= untargeted
    no_listen = sockets_inherited and args.unix_listen is None and len(endpoints) == wanted - 1
    if len(endpoints) != wanted and not no_listen:
        shapes = {
            2: "[source_host:]source_port target_host:target_port",
            1: "one address: "
            + (
                "[source_host:]source_port"
                if args.unix_target or untargeted
                else "target_host:target_port"
            ),
            0: "no positional address with both --unix-listen and --unix-target",
        }
        raise ConfigError(f"expected {shapes[wanted]}, got {len(endpoints)} argument(s)")
    has_listen = args.unix_listen is None and not no_listen
    has_target = args.unix_target is None and not untargeted
    return has_listen, has_target


def _endpoints(
    args: argparse.Namespace, sockets_inherited: bool
) -> tuple[Address, Address | None, WrapConfig | None]:
    """(listen, target, wrapped program) from the positional arguments and --unix-*."""
    has_listen, has_target = _positional_shape(args, sockets_inherited)
    endpoints = list(args.endpoints)
    listen: Address = Config.listen
    if args.unix_listen is not None:
        listen = UnixAddress(args.unix_listen)
    elif has_listen:
        listen = parse_host_port(endpoints.pop(0), "source", default_host=DEFAULT_LISTEN_HOST)
    target: Address | None = None
    if args.unix_target is not None:
        target = UnixAddress(args.unix_target)
    elif has_target:
        target = parse_host_port(endpoints.pop(0), "target")
    if not args.wrap_command:
        return listen, target, None
    if isinstance(target, UnixAddress):
        raise ConfigError("wrap mode: the program is reached over TCP or --wrap-stdio")
    mode = WrapMode(args.wrap_mode or "exit")
    return listen, None, WrapConfig(tuple(args.wrap_command), mode, args.wrap_stdio, target)


def config_from_args(args: argparse.Namespace, *, sockets_inherited: bool = False) -> ServiceConfig:
    """``sockets_inherited``: systemd passed the listening sockets, so the listen address
    may be left out (and is not used when given)."""
    if args.target_config and not args.token_plugin:
        args.token_plugin, args.token_source = "TokenFile", args.target_config
    listen, target, wrap = _endpoints(args, sockets_inherited)
    bridge = Config(
        target=target,
        listen=listen,
        unix_listen_mode=args.unix_listen_mode,
        limits=_limits(args),
        compression=args.compression,
        traffic=args.traffic,
        zero_copy=args.zero_copy,
        **_security_fields(args),
        **_proxy_fields(args),
    )
    metrics = None
    if args.metrics is not None:
        metrics = parse_host_port(args.metrics, "--metrics", default_host=DEFAULT_LISTEN_HOST)
    return ServiceConfig(
        bridge,
        web=Path(args.web) if args.web is not None else None,
        web_listing=args.web_listing,
        web_auth=args.web_auth,
        file_only=args.file_only,
        health_path=args.health_path or None,
        wrap=wrap,
        metrics_listen=metrics,
        record=args.record,
        workers=args.workers,
    )


def setup_logging(verbose: bool, destination: str = "auto") -> None:
    """``destination`` is ``--log``: the journal (with structured fields) or stderr."""
    handler = log_handler(destination)
    handler.addFilter(EscapeControlCharacters())  # client text must not forge log lines
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )


def _leaves(group: BaseExceptionGroup[StartupError]) -> list[StartupError]:
    leaves: list[StartupError] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    line = sys.argv[1:] if argv is None else argv
    argv, command = split_command(line)
    args = parser.parse_intermixed_args(argv)
    args.wrap_command = command
    try:
        # First: LISTEN_FDS is read (and unset) once, and decides whether to bind.
        from_main = sockets_from_main()  # a --workers worker's sockets
        inherited = from_main or inherited_sockets(serve_roles=(Role.WS, Role.WSS, Role.METRICS))
        setup_logging(args.verbose, args.log)
    except StartupError as exc:
        print(f"trio-bridge: {exc}", file=sys.stderr)
        return 1
    try:
        service = config_from_args(args, sockets_inherited=inherited is not None)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.record_priority is not None:  # to be removed in the next minor version
        log.warning(
            "--record-priority is deprecated and has no effect: recordings keep "
            "every frame unless the disk falls behind"
        )
    try:
        addons = _compose(service, inherited)
    except StartupError as exc:  # e.g. a file that cannot be read (CertificateError is both)
        print(f"trio-bridge: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # what only building the parts finds: a plugin, a pattern
        parser.error(str(exc))
    if service.workers > 1:
        try:
            return serve_with_workers(service, inherited, line)
        except StartupError as exc:
            print(f"trio-bridge: {exc}", file=sys.stderr)
            return 1
    if from_main is not None:
        return _run(run_worker, addons, from_main)
    return _run(run, addons, inherited)


def _compose(service: ServiceConfig, inherited: InheritedSockets | None) -> Addons:
    """Every part built once, before anything serves, fitted to the inherited sockets."""
    if inherited is not None and inherited.listening(Role.WSS) and service.bridge.tls is None:
        raise StartupError("a socket named 'wss' needs --cert (and --key)")
    if inherited is not None and inherited.connection is not None and service.wrap is not None:
        # One process per connection cannot supervise a long-lived wrapped program.
        raise StartupError("wrap mode cannot serve an Accept=yes connection")
    if inherited is not None and inherited.connection is not None and service.workers > 1:
        raise StartupError("--workers share listening sockets; an Accept=yes connection is one")
    metrics_sockets = inherited.listening(Role.METRICS) if inherited is not None else ()
    shared_limits = limiter_from_main(service.bridge)  # in a --workers worker
    return Addons(service, metrics_listeners=metrics_sockets, address_limits=shared_limits)


def _run(
    serve: Callable[[Addons, InheritedSockets | None], Awaitable[None]],
    addons: Addons,
    inherited: InheritedSockets | None,
) -> int:
    """Serve; the exit status: 0, the wrapped program's in ``exit`` mode, or 1."""
    failures: list[StartupError] = []
    status = 0
    try:
        trio.run(serve, addons, inherited)
    except* WrappedProgramExited as group:
        status = WrappedProgramExited.status_of(group)
    except* StartupError as group:
        # Errors before "serving" arrive wrapped in the nursery's ExceptionGroup.
        failures = _leaves(group)
    for failure in failures:
        print(f"trio-bridge: {failure}", file=sys.stderr)
    return 1 if failures else status


if __name__ == "__main__":
    sys.exit(main())
