"""A WebSocket endpoint for replays: websockets' sans-I/O protocol over a Trio stream.

Replays need control that a high-level connection hides: send a fragmented message
frame by frame with recorded timing, send a recorded close code, see every frame the
peer sends. The sans-I/O protocol still does everything that must be right: the
handshake, masking, answering pings, the closing handshake.

One task may send while another receives; writes are serialised by a lock.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Sequence

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidURI, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Protocol
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from ..recording import Kind

RECV_SIZE = 65536
log = logging.getLogger("trio_bridge.replay.websocket")


class HandshakeFailed(Exception):
    """The WebSocket could not be opened; the message says why, in one line."""


def close_payload(payload: bytes) -> tuple[int | None, str]:
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


class WsEndpoint:
    """One open WebSocket connection, either side."""

    def __init__(self, stream: trio.abc.Stream, protocol: Protocol, peer: str) -> None:
        self.stream = stream
        self.protocol = protocol
        self.peer = peer
        #: A close frame arrived from the peer (``protocol.close_rcvd`` has it).
        self.peer_closing = trio.Event()
        #: The connection is over: nothing more will arrive.
        self.closed = trio.Event()
        self._events: deque[Frame] = deque()
        self._lock = trio.StrictFIFOLock()
        self._broken = False

    async def flush(self) -> None:
        """Send what the protocol has queued (frames, pongs, close replies, EOF)."""
        async with self._lock:
            for chunk in self.protocol.data_to_send():
                if self._broken:
                    return
                try:
                    if chunk:
                        await self.stream.send_all(chunk)
                    elif isinstance(self.stream, trio.abc.HalfCloseableStream):
                        await self.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True

    async def send(self, kind: Kind, payload: bytes, fin: bool = True) -> bool:
        """Send one frame as recorded; False when the connection is no longer open."""
        protocol = self.protocol
        if self._broken or protocol.state is not OPEN:
            return False
        try:
            if kind is Kind.TEXT:
                protocol.send_text(payload, fin)
            elif kind is Kind.BINARY:
                protocol.send_binary(payload, fin)
            elif kind is Kind.CONT:
                protocol.send_continuation(payload, fin)
            elif kind is Kind.PING:
                protocol.send_ping(payload)
            elif kind is Kind.PONG:
                protocol.send_pong(payload)
            elif kind is Kind.CLOSE:
                self._send_close(*close_payload(payload))
            else:
                raise ValueError(f"{kind!r} is not a frame kind")
        except (InvalidState, ProtocolError):
            return False
        await self.flush()
        return not self._broken

    async def close(self, code: int | None = 1000, reason: str = "") -> None:
        """Start the closing handshake (when still open)."""
        if self.protocol.state is OPEN and not self._broken:
            self._send_close(code, reason)
            await self.flush()

    def _send_close(self, code: int | None, reason: str) -> None:
        try:
            if code is None:
                self.protocol.send_close()
            else:
                self.protocol.send_close(code, reason)
        except ProtocolError:  # a code that may not be sent (1005, 1006, ...)
            self.protocol.send_close(1000, reason)

    async def receive(self) -> Frame | None:
        """The next frame from the peer, or None once the connection is over."""
        while not self._events:
            if self.closed.is_set():
                return None
            try:
                data = await self.stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self._take_events(self.protocol.events_received())
            await self.flush()
            if not data:
                self.closed.set()
        return self._events.popleft()

    def _take_events(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, Frame):
                if event.opcode is Opcode.CLOSE:
                    self.peer_closing.set()
                self._events.append(event)

    def close_received(self) -> tuple[int | None, str] | None:
        received = self.protocol.close_rcvd
        if received is None:
            return None
        return (None if received.code == 1005 else received.code), received.reason

    async def aclose(self) -> None:
        self.closed.set()
        await trio.aclose_forcefully(self.stream)


async def _read_handshake(stream: trio.abc.Stream, protocol: Protocol, who: str) -> list[object]:
    while True:
        try:
            data = await stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HandshakeFailed(f"{who} connection failed during the handshake: {exc}") from None
        if not data:
            raise HandshakeFailed(f"{who} closed the connection during the handshake")
        protocol.receive_data(data)
        events: list[object] = list(protocol.events_received())
        if events:
            return events
        if protocol.handshake_exc is not None:
            raise HandshakeFailed(f"bad handshake from the {who}: {protocol.handshake_exc}")


async def accept(
    stream: trio.abc.Stream, peer: str, *, subprotocol: str | None, timeout: float
) -> WsEndpoint:
    """The server side of the opening handshake; picks ``subprotocol`` if the client offers it."""

    def select(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        if subprotocol is not None and subprotocol in offered:
            return Subprotocol(subprotocol)
        return None

    protocol = ServerProtocol(select_subprotocol=select, max_size=None, logger=log)
    endpoint = WsEndpoint(stream, protocol, peer)
    with trio.move_on_after(timeout) as scope:
        events = await _read_handshake(stream, protocol, "client")
    if scope.cancelled_caught:
        raise HandshakeFailed(f"the client did not complete the handshake within {timeout:g} s")
    request = events[0]
    assert isinstance(request, Request)
    response = protocol.accept(request)
    protocol.send_response(response)
    await endpoint.flush()
    if response.status_code != 101:
        raise HandshakeFailed(
            f"refused the handshake with HTTP {response.status_code}: {protocol.handshake_exc}"
        )
    endpoint._take_events(events[1:])
    return endpoint


async def connect(url: str, *, subprotocols: Sequence[str], timeout: float) -> WsEndpoint:
    """The client side: open a TCP (or TLS, for wss://) connection and the WebSocket."""
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise HandshakeFailed(str(exc)) from None
    with trio.move_on_after(timeout) as scope:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(uri.host, uri.port)
        except OSError as exc:
            raise HandshakeFailed(f"cannot connect to {uri.host}:{uri.port}: {exc}") from None
        if uri.secure:
            context = ssl.create_default_context()
            stream = trio.SSLStream(stream, context, server_hostname=uri.host)
        protocol = ClientProtocol(
            uri,
            subprotocols=[Subprotocol(s) for s in subprotocols] or None,
            max_size=None,
            logger=log,
        )
        protocol.send_request(protocol.connect())
        endpoint = WsEndpoint(stream, protocol, f"{uri.host}:{uri.port}")
        try:
            await endpoint.flush()
            events = await _read_handshake(stream, protocol, "server")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)
        raise HandshakeFailed(f"no WebSocket handshake with {url} within {timeout:g} s")
    response = events[0]
    assert isinstance(response, Response)
    if protocol.handshake_exc is not None or protocol.state is not OPEN:
        await trio.aclose_forcefully(stream)
        raise HandshakeFailed(f"{url} refused the WebSocket: {protocol.handshake_exc}")
    endpoint._take_events(events[1:])
    return endpoint
