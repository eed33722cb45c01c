"""What a request is answered with: a target to relay to, or an HTTP response.

The server asks two questions of every parsed request, through these interfaces:

- :class:`HttpResponder` — is this plain HTTP (a file, a health check) that someone
  other than the relay answers? Only asked for requests that are not WebSocket upgrades.
- :class:`RequestGate` — may this client make this WebSocket request at all (HTTP
  Basic auth, Origin, client certificate)? Asked first, so a refused client causes no
  target lookup.
- :class:`TargetResolver` — which target may this WebSocket request reach? The answer
  comes from operator configuration only (a fixed target, token plugins); a resolver
  refuses with :class:`HttpRefusal` instead of guessing. No open proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.http11 import Request, Response

from .addresses import Address


class HttpRefusal(Exception):
    """Answer the request with ``status`` and a short ``reason`` (body and log line)."""

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class TargetResolver(Protocol):
    async def resolve(self, request: Request, client: str) -> Address:
        """The target for this request, or raise :class:`HttpRefusal`."""
        ...


class HttpResponder(Protocol):
    async def respond(self, request: Request, client: str) -> Response | None:
        """A response for a plain HTTP request, or None when this responder has none."""
        ...


@dataclass(frozen=True)
class ClientInfo:
    """What the bridge knows about a client besides its request, for :class:`RequestGate`.

    ``certificate`` is :meth:`ssl.SSLSocket.getpeercert`'s dict of a client certificate
    that passed verification against ``--cafile``; None without one.

    ``peer`` is the client's address: the one a trusted proxy names (``--proxy-protocol``,
    ``--trusted-proxy``) when there is one, and ``via`` then the proxy's own address.
    ``tls`` and ``certificate`` are about the connection to the bridge, the proxy's then.
    """

    peer: str
    tls: bool = False
    certificate: dict[str, Any] | None = None
    via: str | None = None


class RequestGate(Protocol):
    """An admission check on a WebSocket request (authentication, Origin), asked before
    the :class:`TargetResolver` so a refused client never causes a target lookup."""

    async def check(self, request: Request, client: ClientInfo) -> None:
        """Return to let the request through, or raise :class:`HttpRefusal`."""
        ...


class StaticTarget:
    """Every request goes to the one target on the command line."""

    def __init__(self, target: Address) -> None:
        self.target = target

    def __str__(self) -> str:
        return str(self.target)

    async def resolve(self, request: Request, client: str) -> Address:
        return self.target


def is_websocket_upgrade(request: Request) -> bool:
    return any("websocket" in value.lower() for value in request.headers.get_all("Upgrade"))
