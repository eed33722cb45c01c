"""Per-client-address admission: how many connections one address may hold, how fast it
may open new ones.

The process-wide ``--max-connections`` protects the bridge; these limits protect the
other clients from one noisy or hostile address. They are checked right after
``accept()``, before any byte is read or any TLS handshake is done, so a refused
connection costs almost nothing.

An address is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64, so
per-address IPv6 limits would be trivial to dodge). Unix-socket clients and the
``limit_exempt`` networks (loopback by default: a reverse proxy on the same host
would otherwise make every client look like one) are not limited here.

Refusals are answered ``429 Too Many Requests``; the log gets one line per address
per :data:`LOG_INTERVAL` with a count of the refusals it did not print, so a flood
cannot flood the journal too.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from .config import ConfigError
from .routing import HttpRefusal

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("trio_bridge.limits")

LOG_INTERVAL = 10.0
IPV6_PREFIX = 64
SWEEP_MIN = 1024
TOO_MANY_REQUESTS = 429

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Iterable[str], flag: str) -> tuple[Network, ...]:
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{flag}: {text!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def client_ip(sock: socket.socket) -> str | None:
    """The peer's IP address; None for Unix sockets (and a peer already gone)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


def address_key(address: str, exempt: tuple[Network, ...]) -> str | None:
    """The unit the limits count for a client IP; None when it is not limited."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in exempt):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@dataclass
class _AddressState:
    tokens: float
    updated: float
    open: int = 0
    logged_at: float = -math.inf
    unlogged: int = 0


class Admission:
    """One admitted connection; leaving the ``with`` block (or :meth:`release`) frees it."""

    __slots__ = ("_key", "_limiter")

    def __init__(self, limiter: AddressLimiter | None, key: str | None) -> None:
        self._limiter = limiter
        self._key = key

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None and self._key is not None:
            limiter._release(self._key)

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AddressLimiter:
    """Concurrent-connection cap and token-bucket rate limit per client address.

    ``rate`` new connections per second with bursts of ``burst``; ``None`` turns a
    limit off. State is kept only for addresses that have connections open or a
    bucket still refilling, so memory follows the number of recent clients.
    """

    def __init__(
        self,
        max_per_address: int | None,
        rate: float | None,
        burst: int,
        exempt: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_address = max_per_address
        self.rate = rate
        self.burst = max(1, burst)
        self.exempt = parse_networks(exempt, "--limit-exempt")
        self.clock = clock
        self._states: dict[str, _AddressState] = {}
        self._sweep_at = SWEEP_MIN

    @classmethod
    def for_config(cls, config: Config) -> AddressLimiter:
        limits = config.limits
        return cls(
            limits.max_connections_per_address,
            limits.connection_rate,
            limits.connection_burst,
            config.limit_exempt,
        )

    @property
    def enabled(self) -> bool:
        return self.max_per_address is not None or self.rate is not None

    def admit(self, sock: socket.socket, peer: str) -> Admission | HttpRefusal:
        """Count a new connection from ``sock``'s address, or say why it is refused."""
        return self.admit_address(client_ip(sock) if self.enabled else None, peer)

    def admit_address(self, address: str | None, peer: str) -> Admission | HttpRefusal:
        """:meth:`admit` for a client IP address given as text (None: not limited)."""
        key = address_key(address, self.exempt) if address is not None else None
        if key is None:
            return Admission(None, None)
        now = self.clock()
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= self._sweep_at:
                self._sweep(now)
            state = self._states[key] = _AddressState(tokens=self.burst, updated=now)
        refusal = self._check(state, now)
        if refusal is not None:
            self._log_refusal(state, now, peer, key, refusal.reason)
            return refusal
        state.open += 1
        return Admission(self, key)

    def _check(self, state: _AddressState, now: float) -> HttpRefusal | None:
        limit = self.max_per_address
        if limit is not None and state.open >= limit:
            return HttpRefusal(
                TOO_MANY_REQUESTS,
                f"Too many connections from your address: at most {limit} at a time",
            )
        if self.rate is not None:
            state.tokens = min(self.burst, state.tokens + (now - state.updated) * self.rate)
            state.updated = now
            if state.tokens < 1:
                wait = math.ceil((1 - state.tokens) / self.rate)
                return HttpRefusal(
                    TOO_MANY_REQUESTS,
                    f"Too many new connections from your address: at most {self.rate:g} "
                    f"per second; retry in {wait} s",
                    [("Retry-After", str(wait))],
                )
            state.tokens -= 1
        return None

    def _log_refusal(
        self, state: _AddressState, now: float, peer: str, key: str, reason: str
    ) -> None:
        if now - state.logged_at < LOG_INTERVAL:
            state.unlogged += 1
            return
        more = ""
        if state.unlogged:
            more = f" ({state.unlogged} more refusals of {key} not logged in the last interval)"
        log.warning("client %s: refused with 429: %s%s", peer, reason, more)
        state.logged_at = now
        state.unlogged = 0

    def _release(self, key: str) -> None:
        state = self._states.get(key)
        if state is not None:
            state.open -= 1

    def _sweep(self, now: float) -> None:
        """Forget addresses with nothing open and a full bucket, flushing their log count."""
        rate = self.rate or 0.0
        for key, state in list(self._states.items()):
            quiet = state.unlogged == 0 or now - state.logged_at >= LOG_INTERVAL
            full = rate == 0.0 or state.tokens + (now - state.updated) * rate >= self.burst
            if state.open == 0 and quiet and full:
                if state.unlogged:
                    log.warning("%d more refusals of %s were not logged", state.unlogged, key)
                del self._states[key]
        self._sweep_at = max(SWEEP_MIN, 2 * len(self._states))

    def tracked(self) -> int:
        """How many addresses have state (for tests and diagnostics)."""
        return len(self._states)
