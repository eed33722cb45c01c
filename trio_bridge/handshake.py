"""The opening handshake: read one HTTP request and decide the response.

Parsing and validation are websockets' (:class:`~websockets.server.ServerProtocol`);
this module adds the bridge's policy on top: which subprotocols are acceptable, the
RFC 6455 ``426`` answer to an unknown protocol version, and a deadline for the whole
request so a client that trickles headers cannot hold a connection open.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from websockets.datastructures import Headers
from websockets.exceptions import (
    HeaderLineTooLong,
    InvalidHeader,
    NegotiationError,
    RequestLineTooLong,
    TooManyHeaders,
)
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .channel import ClientChannel
from .config import Config
from .logs import escape
from .netio import PEER_GONE

log = logging.getLogger("trio_bridge.handshake")

BINARY = Subprotocol("binary")
BASE64 = Subprotocol("base64")
SUPPORTED_WEBSOCKET_VERSION = "13"


def select_subprotocol(
    protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """``binary`` when offered; no subprotocol when none is offered; else a clear refusal.

    Browsers fail a connection whose response names none of the subprotocols they
    offered, so accepting silently would only move the error somewhere less clear.
    """
    if BINARY in offered:
        return BINARY
    if not offered:
        return None
    if BASE64 in offered:
        raise NegotiationError(
            "the base64 subprotocol is not supported (use binary, as noVNC >= 1.0 does)"
        )
    raise NegotiationError(
        f"none of the offered subprotocols ({', '.join(offered)}) is supported; "
        "offer binary or no subprotocol"
    )


# websockets' own log: every handshake at INFO (the bridge logs its own summary), and at
# DEBUG each raw request line and header, tokens and credentials included. It stays at
# WARNING wherever the bridge runs, embedded or not; a program that wants it can lower it.
WEBSOCKETS_LOG = logging.getLogger("trio_bridge.websocket")
WEBSOCKETS_LOG.setLevel(logging.WARNING)


def new_protocol(config: Config) -> ServerProtocol:
    extensions = [ServerPerMessageDeflateFactory()] if config.compression else None
    return ServerProtocol(
        select_subprotocol=select_subprotocol,
        extensions=extensions,
        max_size=config.limits.max_message_size,
        logger=WEBSOCKETS_LOG,
    )


# What websockets' request parser answers by itself, by the exception it records.
_PARSER_STATUS: dict[type[Exception], int] = {
    RequestLineTooLong: http.HTTPStatus.REQUEST_URI_TOO_LONG,
    HeaderLineTooLong: http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
    TooManyHeaders: http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
}


class HandshakeFailure(StrEnum):
    """Why a connection ended before its session opened, when no HTTP status says it: the
    ``reason`` label of ``trio_bridge_handshake_failures_total``. One enum, so the metric,
    the code that counts it and docs/metrics.md (a test compares them) name the same set;
    a request refused with an HTTP error counts as ``http_<status>`` instead."""

    TIMEOUT = "timeout"
    MALFORMED = "malformed"
    CLIENT_GONE = "client_gone"
    TLS = "tls"
    PLAIN_ON_SSL_ONLY = "plain_on_ssl_only"
    CONNECTION_LIMIT = "connection_limit"
    EVICTED = "evicted"
    ADDRESS_LIMIT = "address_limit"
    TARGET_UNAVAILABLE = "target_unavailable"
    INTERNAL_ERROR = "internal_error"


@dataclass
class Refusal:
    """Why a connection ended before the WebSocket opened: a metrics label and a log line."""

    kind: HandshakeFailure  # MALFORMED (answered with ``status``) or CLIENT_GONE
    status: int | None
    reason: str


def _version_response(protocol: ServerProtocol, version: str) -> Response:
    response = protocol.reject(
        http.HTTPStatus.UPGRADE_REQUIRED,
        f"Failed to open a WebSocket connection: WebSocket version {version} is not "
        f"supported; this server speaks version {SUPPORTED_WEBSOCKET_VERSION}.\n",
    )
    response.headers["Sec-WebSocket-Version"] = SUPPORTED_WEBSOCKET_VERSION
    response.headers["Upgrade"] = "websocket"
    return response


def decide_response(protocol: ServerProtocol, request: Request) -> Response:
    """websockets' verdict on the request, with 426 for an unsupported version (RFC 6455 4.4)."""
    response = protocol.accept(request)
    exc = protocol.handshake_exc
    if (
        response.status_code == http.HTTPStatus.BAD_REQUEST
        and isinstance(exc, InvalidHeader)
        and exc.name.lower() == "sec-websocket-version"
        and exc.value is not None
        and exc.value != "multiple values"
    ):
        return _version_response(protocol, exc.value)
    return response


def refusal_reason(response: Response) -> str:
    """The first line of a rejection's body, which names the cause, for the log."""
    body = (response.body or b"").decode("utf-8", "replace").strip()
    prefix = "Failed to open a WebSocket connection: "
    first = body.splitlines()[0] if body else response.reason_phrase
    return first.removeprefix(prefix).rstrip(".")


async def receive_request(channel: ClientChannel) -> Request | Refusal:
    """Read bytes until websockets has parsed a request or the client gives up.

    The caller bounds the time (the connection's handshake budget, TLS included). A
    request that is malformed or too large is answered here, 400/414/431 naming the
    cause, and a :class:`Refusal` returned.
    """
    protocol = channel.protocol
    while True:
        try:
            data = await channel.transport.recv(4096)
        except PEER_GONE:
            data = b""
        if not data:
            return Refusal(
                HandshakeFailure.CLIENT_GONE,
                None,
                "client closed the connection during the handshake",
            )
        protocol.receive_data(data)
        events = protocol.events_received()
        if events:
            request = events[0]
            assert isinstance(request, Request)
            return request
        if protocol.handshake_exc is not None:
            return await _refuse_unparsed(channel, protocol.handshake_exc)


async def _refuse_unparsed(channel: ClientChannel, exc: Exception) -> Refusal:
    """Answer a request websockets could not parse, and say why for the log.

    websockets answers only the size limits itself (414/431); for anything else
    (a request body, a transfer coding, a broken header) it just closes, which leaves
    a client guessing. Those get 400 with the cause, sent before websockets' EOF.
    """
    cause = exc.__cause__
    detail = escape(f"{exc}: {cause}" if cause else str(exc))
    status = _PARSER_STATUS.get(type(exc))
    if status is None:
        status = http.HTTPStatus.BAD_REQUEST
        response = plain_response(status, f"Bad HTTP request: {detail}.\n")
        await channel.send_raw(response.serialize())
    await channel.flush()
    return Refusal(
        HandshakeFailure.MALFORMED, status, f"refused with {status}: bad HTTP request ({detail})"
    )


def plain_response(status: http.HTTPStatus, text: str) -> Response:
    """An HTTP error response for a connection refused before parsing (e.g. 503)."""
    body = text.encode()
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)
