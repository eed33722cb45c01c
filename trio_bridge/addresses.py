"""Where the bridge listens and relays to: TCP and Unix-socket addresses, and their parsing.

Shared vocabulary: imported by configuration, token plugins and the server alike, so it
imports nothing of the project but :mod:`trio_bridge.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_LISTEN_HOST = "127.0.0.1"


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
