"""What the operator configured: plain, frozen values, and the one place they are checked.

Two levels, as in the process:

- :class:`Config` is what one :class:`~trio_bridge.server.Bridge` reads: where it
  listens and relays to, limits, TLS, token routing and authentication.
- :class:`ServiceConfig` adds what a command line runs around a bridge: files and the
  health endpoint on the same port, a wrapped program, metrics, recordings
  (:class:`~trio_bridge.addons.Addons` builds those parts).

Values here are data, never I/O: no file is read and no plugin is loaded when a config
is made (so a settings object is cheap, comparable and can be made twice). Every check
that needs only the values runs in ``__post_init__`` below, so a program that builds a
config directly gets the same clear errors as a person typing a command line. What
only the files or plugins can tell (a missing certificate, an unknown plugin) is found
once, when the parts are built, before the bridge serves.

This module imports only the shared vocabulary (:mod:`.addresses`, :mod:`.errors`):
everything else imports it, so it can import nothing else without a cycle.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from .addresses import (
    DEFAULT_LISTEN_HOST,
    Address,
    TcpAddress,
    UnixAddress,
    parse_host_port,
    parse_port,
)
from .errors import ConfigError, StartupError

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "TLS_VERSIONS",
    "TOKEN_FROM",
    "Address",
    "AuthSettings",
    "Config",
    "ConfigError",
    "Limits",
    "ServiceConfig",
    "StartupError",
    "TargetTlsSettings",
    "TcpAddress",
    "TlsSettings",
    "TokenSettings",
    "UnixAddress",
    "WrapConfig",
    "WrapMode",
    "parse_host_port",
    "parse_port",
]


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-process bounds. ``None`` means no limit."""

    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    close_timeout: float = 2.0
    # Off by default: a quiet console whose browser answers pings is a live session;
    # the heartbeat finds a peer that vanished without a FIN (a laptop lid, a NAT).
    idle_timeout: float | None = None
    session_timeout: float | None = None
    heartbeat: float | None = 30.0
    max_message_size: int = 1 << 20
    max_connections: int = 1024
    # Connections still in their opening handshake: a share of max_connections of
    # their own, so slow handshakes cannot lock everyone else out (limits.HandshakeBudget).
    max_handshakes: int = 256
    shutdown_grace: float = 10.0
    # Per client address (IPv4, or IPv6 /64), outside Config.limit_exempt: docs/security.md.
    max_connections_per_address: int | None = 64
    connection_rate: float | None = 20.0  # new connections per second
    connection_burst: int = 60

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value <= 0:
                flag = "--" + field.name.replace("_", "-")
                raise ConfigError(f"{flag}: must be greater than 0, got {value}")


TLS_VERSIONS = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
    # websockify's --ssl-version spellings, so its command lines keep working
    "tlsv1_2": ssl.TLSVersion.TLSv1_2,
    "tlsv1_3": ssl.TLSVersion.TLSv1_3,
    "default": ssl.TLSVersion.TLSv1_2,
}


@dataclass(frozen=True)
class TlsSettings:
    """Server-side TLS: ``--cert``/``--key`` and the options that shape the context.

    ``cafile`` alone verifies client certificates when clients present one;
    ``verify_client`` makes one mandatory (the handshake fails without it). The files
    are read when the bridge is built (:class:`~trio_bridge.tls.ServerTls`).
    ``key_password`` says where an encrypted key's password is (``file:PATH``,
    ``env:NAME``, ``credential:NAME``), never the password itself.
    """

    cert: str
    key: str | None = None
    ssl_only: bool = False
    minimum_version: str = "1.2"
    ciphers: str | None = None
    verify_client: bool = False
    cafile: str | None = None
    key_password: str | None = None

    def __post_init__(self) -> None:
        if self.key_password is not None:
            _check_password_source(self.key_password)
        if self.minimum_version not in TLS_VERSIONS:
            raise ConfigError(
                f"--ssl-minimum-version: {self.minimum_version!r} is not one of 1.2, 1.3 "
                "(TLS 1.0 and 1.1 are not offered: they are broken)"
            )
        if self.verify_client and not self.cafile:
            raise ConfigError("--verify-client needs --cafile: the CAs of client certificates")


def _check_password_source(source: str) -> None:
    """``--key-password`` names where the password is: a password given on the command
    line is visible to every local user (ps, /proc). The error never quotes ``source``."""
    kind, _, name = source.partition(":")
    plain_name = name not in ("", ".", "..") and "/" not in name
    if not (
        (kind == "file" and name)
        or (kind == "env" and name.isascii() and name.isidentifier())
        or (kind == "credential" and plain_name)
    ):
        raise ConfigError(
            "--key-password: expected file:PATH, env:NAME or credential:NAME, never the "
            "password itself (a command line is visible to every local user)"
        )


@dataclass(frozen=True)
class TargetTlsSettings:
    """``--ssl-target``: TLS to the target, verified against ``cafile`` (default: system CAs).

    The certificate must name ``server_name``, or the target's host when that is None;
    ``verify=False`` is the explicit, logged opt-out for self-signed targets.
    """

    cafile: str | None = None
    server_name: str | None = None
    verify: bool = True


TOKEN_FROM = ("query", "path", "host")


@dataclass(frozen=True)
class TokenSettings:
    """``--token-plugin``, ``--token-source`` and where the token is read from.

    ``jwt_audience`` and ``jwt_issuer`` (JWTTokenApi only): the ``aud`` and ``iss``
    claims every token must carry.
    """

    plugin: str
    source: str | None = None
    token_from: str = "query"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None

    def __post_init__(self) -> None:
        if self.token_from not in TOKEN_FROM:
            choices = ", ".join(TOKEN_FROM)
            raise ConfigError(f"--token-from: {self.token_from!r} is not one of {choices}")
        claims = (("--jwt-audience", self.jwt_audience), ("--jwt-issuer", self.jwt_issuer))
        for flag, value in claims:
            if value is not None and not value.strip():
                raise ConfigError(f"{flag}: empty")


@dataclass(frozen=True)
class AuthSettings:
    """One ``--auth-plugin`` with its ``--auth-source``."""

    plugin: str
    source: str | None = None


@dataclass(frozen=True)
class Config:
    """Everything one :class:`~trio_bridge.server.Bridge` reads.

    ``listen`` is where the bridge binds when it is not handed sockets (by systemd or
    by an embedding program); ``target`` is the only place clients are relayed to,
    unless ``tokens`` name one target per client (or a resolver is given to the bridge).
    """

    target: Address | None  # None: a resolver decides (tokens, --file-only, wrap mode)
    listen: Address = TcpAddress(DEFAULT_LISTEN_HOST, 6080)
    unix_listen_mode: int | None = None
    limits: Limits = Limits()
    compression: bool = False
    traffic: bool = False
    zero_copy: bool = True
    # TLS, token routing, authentication, per-address limits (docs/security.md).
    tls: TlsSettings | None = None
    target_tls: TargetTlsSettings | None = None
    tokens: TokenSettings | None = None
    allow_targets: tuple[str, ...] = ()
    auth: tuple[AuthSettings, ...] = ()
    allow_origins: tuple[str, ...] = ()
    limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Behind load balancers (docs/scaling.md): networks whose connections start with a
    # PROXY protocol header, networks whose X-Forwarded-For/Forwarded is believed.
    proxy_protocol: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    forwarded_header: str = "x-forwarded-for"

    def __post_init__(self) -> None:
        _check_networks("--proxy-protocol", self.proxy_protocol)
        _check_networks("--trusted-proxy", self.trusted_proxies)
        if self.forwarded_header not in FORWARDED_HEADERS:
            choices = ", ".join(FORWARDED_HEADERS)
            given = self.forwarded_header
            raise ConfigError(f"--forwarded-header: {given!r} is not one of {choices}")
        if isinstance(self.target, UnixAddress) and not self.target.path:
            raise ConfigError("--unix-target: the path is empty")
        if self.unix_listen_mode is not None and not isinstance(self.listen, UnixAddress):
            raise ConfigError("--unix-listen-mode needs --unix-listen")
        if self.tokens is not None and self.target is not None:
            raise ConfigError("--token-plugin routes each client by its token: give no target")


FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


def _check_networks(flag: str, texts: tuple[str, ...]) -> None:
    """Addresses, networks, or ``uid:N``: the user of a Unix-socket peer (a proxy on the
    same host connecting to ``--unix-listen``)."""
    for text in texts:
        if text.startswith("uid:") and text[4:].isdigit():
            continue
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(
                f"{flag}: {text!r} is not an address, a network (CIDR) or uid:N"
            ) from None


class WrapMode(enum.Enum):
    """What the bridge does when the wrapped program exits."""

    IGNORE = "ignore"
    EXIT = "exit"
    RESPAWN = "respawn"


@dataclass(frozen=True)
class WrapConfig:
    """The program and how to reach it; ``target`` is None for ``--wrap-stdio`` and when
    the bridge chooses a free port on 127.0.0.1 (docs/wrap-mode.md)."""

    command: tuple[str, ...]
    mode: WrapMode = WrapMode.EXIT
    stdio: bool = False
    target: TcpAddress | None = None
    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("wrap mode: no program given after --")
        if self.stdio and self.target is not None:
            raise ConfigError("--wrap-stdio relays to the program's stdin/stdout: give no target")


@dataclass(frozen=True)
class ServiceConfig:
    """A bridge and what the command line runs around it (docs/cli.md).

    ``web``: plain HTTP files on the WebSocket port (docs/web.md); ``health_path``: the
    load balancers' endpoint; ``wrap``: a program the bridge starts and relays to
    (docs/wrap-mode.md); ``metrics_listen``: Prometheus (docs/metrics.md); ``record``:
    one recording per session in this folder (docs/recording-format.md); ``workers``:
    that many bridge processes on the same listening sockets (docs/scaling.md).
    """

    bridge: Config
    web: Path | None = None
    web_listing: bool = False
    web_auth: bool = False
    file_only: bool = False
    health_path: str | None = "/healthz"
    wrap: WrapConfig | None = None
    metrics_listen: TcpAddress | None = None
    record: Path | None = None
    workers: int = 1  # processes accepting on the same sockets (trio_bridge.workers)

    def __post_init__(self) -> None:
        bridge = self.bridge
        if self.workers < 1:
            raise ConfigError(f"--workers: must be 1 or more, got {self.workers}")
        if self.workers > 1 and self.wrap is not None:
            raise ConfigError("wrap mode runs one program for one bridge: drop --workers")
        if self.web is None and (self.web_listing or self.web_auth or self.file_only):
            raise ConfigError("--web-listing, --web-auth and --file-only need --web DIR")
        if self.web_auth and not bridge.auth:
            raise ConfigError(
                "--web-auth: no --auth-plugin to apply to files (Origin checks do not apply: "
                "browsers send no Origin header when they load a page)"
            )
        relays_elsewhere = self.file_only or self.wrap is not None
        if self.file_only and self.wrap is not None:
            raise ConfigError("--file-only relays nothing: give no wrapped program")
        if relays_elsewhere and bridge.target is not None:
            raise ConfigError(
                "--file-only relays nothing: give no target"
                if self.file_only
                else "wrap mode: the program's address goes in WrapConfig.target"
            )
        if relays_elsewhere and bridge.tokens is not None:
            raise ConfigError(
                "--file-only relays nothing: drop --token-plugin"
                if self.file_only
                else "wrap mode relays to its one program: drop --token-plugin"
            )
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ConfigError(f"--health-path: {self.health_path!r} must start with /")
