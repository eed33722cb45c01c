"""Per-client-address admission: how many connections one address may hold, how fast it
may open new ones.

The process-wide ``--max-connections`` protects the bridge; these limits protect the
other clients from one noisy or hostile address. They are checked right after
``accept()``, before any byte is read or any TLS handshake is done, so a refused
connection costs almost nothing.

An address is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64, so
per-address IPv6 limits would be trivial to dodge). A Unix-socket client is keyed on
its user id, which the kernel reports (``SO_PEERCRED``): ``uid:N``. The
``limit_exempt`` networks and ``uid:N`` entries are not limited (loopback by default:
a reverse proxy on the same host would otherwise make every client look like one;
exempt a proxy that connects over a Unix socket by its uid). Proxies that name their
clients (``--proxy-protocol``, ``--trusted-proxy``) are exempt too: the server admits
each of their connections a second time, under the client's address, once it knows it.

Connections that have not finished their opening handshake have a budget of their
own (:class:`HandshakeBudget`), so slow handshakes cannot fill the connection table.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import trio

from .config import Config
from .errors import ConfigError
from .netio import peer_uid
from .routing import HttpRefusal

log = logging.getLogger("trio_bridge.limits")

LOG_INTERVAL = 10.0
IPV6_PREFIX = 64
SWEEP_MIN = 1024
TOO_MANY_REQUESTS = 429

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Iterable[str], flag: str) -> tuple[Network, ...]:
    """The networks among ``texts``; ``uid:N`` entries (Unix-socket users) are skipped."""
    networks = []
    for text in texts:
        if text.startswith("uid:"):
            parse_uid(text, flag)
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(
                f"{flag}: {text!r} is not an address, a network (CIDR) or uid:N"
            ) from None
    return tuple(networks)


class Networks:
    """Networks and Unix-socket users (``uid:N``) asked about client addresses given as
    text: an IP address, or ``uid:N`` for a Unix-socket peer (``--proxy-protocol``,
    ``--trusted-proxy``). An IPv4-mapped IPv6 address counts as its IPv4 address; other
    text is in none of them."""

    def __init__(
        self, networks: tuple[Network, ...] = (), uids: frozenset[int] = frozenset()
    ) -> None:
        self.networks = networks
        self.uids = uids

    @classmethod
    def parse(cls, texts: Iterable[str], flag: str) -> Networks:
        texts = tuple(texts)
        return cls(parse_networks(texts, flag), exempt_uids(texts, flag))

    def __bool__(self) -> bool:
        return bool(self.networks or self.uids)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        if address.startswith("uid:"):
            return address[4:].isdigit() and int(address[4:]) in self.uids
        ip = parse_ip(address)
        return ip is not None and any(ip in network for network in self.networks)


def parse_uid(text: str, flag: str) -> int:
    digits = text.removeprefix("uid:")
    if not digits.isdigit():
        raise ConfigError(f"{flag}: {text!r}: uid:N takes a numeric user id")
    return int(digits)


def exempt_uids(texts: Iterable[str], flag: str) -> frozenset[int]:
    return frozenset(parse_uid(text, flag) for text in texts if text.startswith("uid:"))


def client_ip(sock: socket.socket) -> str | None:
    """The peer's IP address; None for Unix sockets (and a peer already gone)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


def parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, an IPv4-mapped IPv6 one as the IPv4 it is; None for anything else."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(address: str, exempt: tuple[Network, ...]) -> str | None:
    """The unit the limits count for a client IP; None when it is not limited."""
    ip = parse_ip(address)
    if ip is None or any(ip in network for network in exempt):
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
        exempt = tuple(exempt)
        self.exempt = parse_networks(exempt, "--limit-exempt")
        self.exempt_uids = exempt_uids(exempt, "--limit-exempt")
        self.clock = clock
        self._states: dict[str, _AddressState] = {}
        self._sweep_at = SWEEP_MIN

    @classmethod
    def for_config(cls, config: Config) -> Self:
        """Proxies the bridge trusts to name their clients are never limited as themselves:
        each connection is counted once, under the client address they name (the server
        admits it again once it knows that address)."""
        limits = config.limits
        return cls(
            limits.max_connections_per_address,
            limits.connection_rate,
            limits.connection_burst,
            config.limit_exempt + config.proxy_protocol + config.trusted_proxies,
        )

    @property
    def enabled(self) -> bool:
        return self.max_per_address is not None or self.rate is not None

    def admit(self, sock: socket.socket, peer: str) -> Admission | HttpRefusal:
        """Count a new connection from ``sock``'s address, or say why it is refused."""
        return self.admit_key(self.key_of(sock), peer)

    def admit_address(self, address: str | None, peer: str) -> Admission | HttpRefusal:
        """:meth:`admit` for a client IP address given as text (None: not limited)."""
        return self.admit_key(self.key_of_address(address), peer)

    def key_of(self, sock: socket.socket) -> str | None:
        """What ``sock``'s connection counts under: its address (IPv6: /64) or its
        Unix user; None when it is not limited."""
        if not self.enabled:
            return None
        uid = peer_uid(sock)
        if uid is not None:
            return None if uid in self.exempt_uids else f"uid:{uid}"
        return self.key_of_address(client_ip(sock))

    def key_of_address(self, address: str | None) -> str | None:
        if not self.enabled or address is None:
            return None
        return address_key(address, self.exempt)

    async def admit_connection(self, sock: socket.socket, peer: str) -> Admission | HttpRefusal:
        """What the server calls: :meth:`admit`, or its shared form across workers
        (:class:`trio_bridge.workers.SharedAddressLimiter` asks the main process)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.admit(sock, peer)

    async def admit_client(self, address: str | None, peer: str) -> Admission | HttpRefusal:
        """What the server calls for the address a proxy names: :meth:`admit_address`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.admit_address(address, peer)

    def admit_key(self, key: str | None, peer: str) -> Admission | HttpRefusal:
        """:meth:`admit` for a counting unit (an address, a /64, a uid; None: not limited)."""
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


# -- connections still in their opening handshake ----------------------------------------


@dataclass(eq=False)
class Handshake:
    """One connection's opening handshake: its time budget and whether it was evicted."""

    timeout: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    evicted: bool = False


class HandshakeBudget:
    """A share of the connection table for connections that are still handshaking.

    Slow handshakes (slowloris: a trickle of header bytes, or TLS that never finishes)
    cost the attacker nothing but a socket. Without a budget of their own they fill
    ``--max-connections`` and lock out everyone else, even from other addresses. Here:

    - at most ``limit`` connections handshake at once; a new one evicts the oldest
      (an honest client finishes in milliseconds, so the oldest is the likeliest
      attacker, and a newcomer always gets its turn);
    - once half the budget is in use, new handshakes get a quarter of the timeout
      (at least one second).
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.full_timeout = timeout
        self._pending: dict[Handshake, None] = {}  # oldest first

    def timeout(self) -> float:
        if len(self._pending) < self.limit // 2:
            return self.full_timeout
        return min(self.full_timeout, max(1.0, self.full_timeout / 4))

    @contextmanager
    def enter(self) -> Iterator[Handshake]:
        """Run the block as one handshake: cancelled at its deadline or when evicted."""
        handshake = Handshake(self.timeout())
        handshake.scope.deadline = trio.current_time() + handshake.timeout
        if len(self._pending) >= self.limit:
            self.evict_oldest()
        self._pending[handshake] = None
        try:
            with handshake.scope:
                yield handshake
        finally:
            self._pending.pop(handshake, None)

    def leave(self, handshake: Handshake) -> None:
        """The request has arrived: no more deadline, and no longer evictable."""
        self._pending.pop(handshake, None)
        handshake.scope.deadline = math.inf

    def evict_oldest(self) -> bool:
        """Cancel the oldest handshake in progress; False when there is none."""
        if not self._pending:
            return False
        oldest = next(iter(self._pending))
        del self._pending[oldest]
        oldest.evicted = True
        oldest.scope.cancel()
        return True

    def __len__(self) -> int:
        return len(self._pending)
