"""``--allow-target`` patterns: the targets any route may reach, whatever vouches for them.

A second line of defence under token routing: a leaked token file or a compromised
token store can only point clients at targets the command line allows.

Patterns (repeat the flag for several)::

    10.0.0.5:5900            one target
    10.0.0.0/24:5900-5999    an IPv4 or IPv6 network (CIDR) and a port range
    [2001:db8::/64]:*        any port
    *.vnc.example.com:5900   a host-name glob (case-insensitive)
    unix:/run/consoles/*     Unix sockets, by path glob

Host names are matched in the form the connection uses (ASCII, IDNA-encoded,
lower-case; see :func:`~trio_bridge.tokens.base.canonical_host`), never resolved: a name
pattern allows exactly the names it spells, and a network pattern only matches address
literals.

Globs have ``*`` (any run of characters) and ``?`` (one character), and neither crosses
a separator: in a host name ``*`` is within one label (``127.0.0.*`` does not match
``127.0.0.1.evil.example``), in a path within one folder entry (``/run/vnc/*`` does not
match ``/run/vnc/sub/x``). Every other character matches itself. A Unix path with a
``..`` component is never allowed: the kernel resolves ``a/link/..`` through the
symbolic link, so no text normalisation can say where it leads.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..addresses import Address, UnixAddress
from ..errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def glob_regex(glob: str, separator: str) -> re.Pattern[str]:
    """``glob`` as a regular expression in which ``*`` and ``?`` never match ``separator``."""
    other = f"[^{re.escape(separator)}]"
    parts = [f"{other}*" if c == "*" else other if c == "?" else re.escape(c) for c in glob]
    return re.compile("".join(parts))


def plain_unix_path(path: str) -> str | None:
    """``path`` without ``.`` components and repeated slashes, or None when it is not
    absolute or has a ``..`` component (see the module docs)."""
    if not path.startswith("/") or ".." in path.split("/"):
        return None
    return "/" + posixpath.normpath(path).lstrip("/")


@dataclass(frozen=True)
class TargetPattern:
    text: str
    unix_glob: re.Pattern[str] | None = None
    network: Network | None = None
    host_glob: re.Pattern[str] | None = None
    ports: tuple[int, int] = (0, 65535)

    @classmethod
    def parse(cls, text: str) -> TargetPattern:
        flag = f"--allow-target {text!r}"
        if text.startswith("unix:"):
            glob = plain_unix_path(text.removeprefix("unix:"))
            if glob is None:
                raise ConfigError(f"{flag}: a Unix-socket pattern needs an absolute path, no '..'")
            return cls(text, unix_glob=glob_regex(glob, "/"))
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
            pass
        if not host.isascii():
            raise ConfigError(f"{flag}: write internationalised names in their xn-- form")
        return cls(text, host_glob=glob_regex(host.lower(), "."), ports=port_range)

    def allows(self, target: Address) -> bool:
        """Whether ``target`` (as :func:`~trio_bridge.tokens.base.check_target` returns
        it: the host canonical) is within this pattern."""
        if isinstance(target, UnixAddress):
            path = plain_unix_path(target.path)
            return (
                self.unix_glob is not None
                and path is not None
                and bool(self.unix_glob.fullmatch(path))
            )
        if self.unix_glob is not None or not self.ports[0] <= target.port <= self.ports[1]:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(target.host) in self.network
            except ValueError:
                return False
        assert self.host_glob is not None
        return bool(self.host_glob.fullmatch(target.host.lower()))


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
