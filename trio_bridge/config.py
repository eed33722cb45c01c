"""The bridge's configuration: one frozen value built by the CLI or by an embedding program.

Validation lives here, not in the CLI, so a program that builds a :class:`Config`
directly gets the same clear errors as a person typing a command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import AuthSettings
    from .tls import TargetTlsSettings, TlsSettings
    from .tokens import TokenSettings
    from .wrap import WrapConfig


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and why."""


class StartupError(Exception):
    """The bridge cannot start (a port is taken, a folder is missing, ...).

    The message is one line naming the cause; the CLI prints it and exits 1. Raise it
    (or a subclass) from anything that runs before the bridge reports it is serving.
    """


@dataclass(frozen=True)
class TcpAddress:
    """A TCP endpoint: a host name or address literal and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A Unix-domain stream socket, by path."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = TcpAddress | UnixAddress


def parse_port(text: str, what: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range 0-65535")
    return port


def parse_host_port(text: str, what: str, default_host: str | None = None) -> TcpAddress:
    """Parse ``host:port``, ``[v6]:port`` or, when ``default_host`` is given, a bare ``port``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{what}: {text!r} is not of the form [ipv6]:port")
        return TcpAddress(host, parse_port(rest[1:], what))
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise ConfigError(f"{what}: {text!r} is not of the form host:port")
        return TcpAddress(default_host, parse_port(text, what))
    if not host:
        if default_host is None:
            raise ConfigError(f"{what}: {text!r} has no host")
        host = default_host
    if ":" in host:
        raise ConfigError(f"{what}: write IPv6 addresses in brackets, as [{host}]:{port}")
    return TcpAddress(host, parse_port(port, what))


DEFAULT_LISTEN_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-process bounds. ``None`` means no limit."""

    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    close_timeout: float = 2.0
    # A production default: a peer that vanished without a FIN (a laptop lid, a NAT
    # timeout) is found within two heartbeats; a quiet but live session is kept.
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


@dataclass(frozen=True)
class Config:
    """Everything one bridge process needs to know.

    ``listen`` is where the bridge binds when it is not handed sockets (by systemd or
    by an embedding program); ``target`` is the only place clients are relayed to.
    """

    target: Address | None  # None: a resolver decides (--file-only, wrap mode, ...)
    listen: Address = TcpAddress(DEFAULT_LISTEN_HOST, 6080)
    unix_listen_mode: int | None = None
    limits: Limits = Limits()
    compression: bool = False
    traffic: bool = False
    zero_copy: bool = True
    # Plain HTTP on the WebSocket port (docs/web.md), wrap mode, metrics (docs/metrics.md).
    web: Path | None = None
    web_listing: bool = False
    web_auth: bool = False
    file_only: bool = False
    health_path: str | None = "/healthz"
    wrap: WrapConfig | None = None
    metrics_listen: TcpAddress | None = None
    # TLS, token routing, authentication, per-address limits (docs/security.md).
    tls: TlsSettings | None = None
    target_tls: TargetTlsSettings | None = None
    tokens: TokenSettings | None = None
    allow_targets: tuple[str, ...] = ()
    auth: tuple[AuthSettings, ...] = ()
    allow_origins: tuple[str, ...] = ()
    limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # --record: one file per session in this folder (docs/recording-format.md). The CLI
    # runs the recorder; an embedding program passes observers=Recorder(...) to Bridge.
    record: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, UnixAddress) and not self.target.path:
            raise ConfigError("--unix-target: the path is empty")
        if isinstance(self.listen, UnixAddress):
            parent = Path(self.listen.path).parent
            if not parent.is_dir():
                raise ConfigError(f"--unix-listen: folder {parent} does not exist")
        if self.unix_listen_mode is not None and not isinstance(self.listen, UnixAddress):
            raise ConfigError("--unix-listen-mode needs --unix-listen")
        _check_web_and_wrap(self)
        _check_security_options(self)


def _check_web_and_wrap(config: Config) -> None:
    """--web, --file-only, --health-path and wrap mode (docs/web.md, docs/wrap-mode.md)."""
    if config.web is not None and not Path(config.web).is_dir():
        raise ConfigError(f"--web: {config.web} is not a folder")
    if config.web is None and (config.web_listing or config.web_auth or config.file_only):
        raise ConfigError("--web-listing, --web-auth and --file-only need --web DIR")
    if config.file_only and (config.wrap is not None or config.target is not None):
        raise ConfigError("--file-only relays nothing: give no target and no wrapped program")
    if config.wrap is not None and config.target is not None:
        raise ConfigError("wrap mode: the program's address goes in WrapConfig.target")
    if config.wrap is not None and config.tokens is not None:
        raise ConfigError("wrap mode relays to its one program: drop --token-plugin")
    if config.health_path is not None and not config.health_path.startswith("/"):
        raise ConfigError(f"--health-path: {config.health_path!r} must start with /")


def _check_security_options(config: Config) -> None:
    """Cross-field checks of docs/security.md (each settings object checks itself)."""
    from .auth import check_auth  # here: those modules import this one
    from .limits import parse_networks
    from .tokens import check_routing

    check_routing(config)
    check_auth(config)
    parse_networks(config.limit_exempt, "--limit-exempt")
