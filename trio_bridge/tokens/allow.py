"""``--allow-target`` patterns: the targets any route may reach, whatever vouches for them.

A second line of defence under token routing: a leaked token file or a compromised
token store can only point clients at targets the command line allows.

Patterns (repeat the flag for several)::

    10.0.0.5:5900            one target
    10.0.0.0/24:5900-5999    an IPv4 or IPv6 network (CIDR) and a port range
    [2001:db8::/64]:*        any port
    *.vnc.example.com:5900   a host-name glob (case-insensitive)
    unix:/run/consoles/*     Unix sockets, by path glob

Host names are matched as written in the token data, never resolved: a name pattern
allows exactly that name, and a network pattern only matches address literals.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import Address, ConfigError, UnixAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TargetPattern:
    text: str
    unix_glob: str | None = None
    network: Network | None = None
    host_glob: str | None = None
    ports: tuple[int, int] = (0, 65535)

    @classmethod
    def parse(cls, text: str) -> TargetPattern:
        flag = f"--allow-target {text!r}"
        if text.startswith("unix:"):
            glob = text.removeprefix("unix:")
            if not glob.startswith("/"):
                raise ConfigError(f"{flag}: a Unix-socket pattern needs an absolute path")
            return cls(text, unix_glob=glob)
        host, sep, ports = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{flag}: expected HOST:PORTS, [IPv6]:PORTS or unix:PATH")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{flag}: write IPv6 addresses in brackets, as [{host}]:{ports}")
        port_range = _parse_ports(ports, flag)
        try:
            return cls(text, network=ipaddress.ip_network(host, strict=False), ports=port_range)
        except ValueError:
            return cls(text, host_glob=host.lower(), ports=port_range)

    def allows(self, target: Address) -> bool:
        if isinstance(target, UnixAddress):
            return self.unix_glob is not None and fnmatch.fnmatchcase(target.path, self.unix_glob)
        if self.unix_glob is not None or not self.ports[0] <= target.port <= self.ports[1]:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(target.host) in self.network
            except ValueError:
                return False
        assert self.host_glob is not None
        return fnmatch.fnmatchcase(target.host.lower(), self.host_glob)


def _parse_ports(text: str, flag: str) -> tuple[int, int]:
    if text == "*":
        return (1, 65535)
    low, sep, high = text.partition("-")
    try:
        first = int(low)
        last = int(high) if sep else first
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a port, a range N-M or *") from None
    if not 0 < first <= last < 65536:
        raise ConfigError(f"{flag}: port range {text!r} is not within 1-65535")
    return (first, last)


class TargetAllowlist:
    """Empty means "no restriction beyond the routing itself"."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [TargetPattern.parse(text) for text in patterns]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def allows(self, target: Address) -> bool:
        return not self.patterns or any(pattern.allows(target) for pattern in self.patterns)


__all__ = ["TargetAllowlist", "TargetPattern"]
