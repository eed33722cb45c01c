"""Sending a recording's frames, one at a time, through a ``websockets.trio`` connection.

websockets' public API sends messages, not frames, and does everything that must be
right (handshake, masking, answering pings, the closing handshake). A recorded frame
maps onto it as follows:

- a complete text or binary message is one ``send``;
- a fragmented one is one ``send`` of an async iterable (a memory channel) fed as its
  fragments come up in the recording, so each keeps its recorded time. websockets ends
  such a message with an empty final frame: a recorded last fragment that carries data
  arrives as that fragment plus an empty final one (same message, one frame more; it is
  exactly the recording when websockets recorded the client, as in our own tests);
- a ping is ``ping`` (skipped when one with the same payload still awaits its pong:
  websockets refuses the duplicate), a pong ``pong``, a close ``aclose`` with the
  recorded code (1000 when the recorded one may not be sent: none, 1005, 1006, ...).
"""

from __future__ import annotations

import contextlib

import trio
from websockets.exceptions import ConcurrencyError, ConnectionClosed
from websockets.protocol import State
from websockets.trio.connection import Connection

from ..recording import Kind

# Close codes an endpoint may send (RFC 6455 7.4.1 and the IANA registry).
_SENDABLE = {1000, 1001, 1002, 1003, *range(1007, 1015)}


def close_payload(payload: bytes) -> tuple[int | None, str]:
    """A close frame's payload as (code, reason); no code when the payload is empty."""
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


class FrameSender:
    """Sends recorded frames on ``ws``; fragmented messages are sent by a task in ``nursery``."""

    def __init__(self, ws: Connection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self._nursery = nursery
        self._fragments: trio.MemorySendChannel[bytes] | None = None
        self._message_sent = trio.Event()

    async def send(self, kind: Kind, payload: bytes, fin: bool = True) -> bool:
        """Send one recorded frame; False when the connection is no longer open."""
        if self.ws.state is not State.OPEN:
            return False
        try:
            if kind in (Kind.TEXT, Kind.BINARY):
                await self._start_message(kind is Kind.TEXT, payload, fin)
            elif kind is Kind.CONT:
                await self._continue_message(payload, fin)
            elif kind is Kind.PING:
                with contextlib.suppress(ConcurrencyError):
                    await self.ws.ping(payload)
            elif kind is Kind.PONG:
                await self.ws.pong(payload)
            elif kind is Kind.CLOSE:
                await self._close(payload)
            else:
                raise ValueError(f"{kind!r} is not a frame kind")
        except (ConnectionClosed, trio.BrokenResourceError):
            return False
        return True

    async def _start_message(self, text: bool, payload: bytes, fin: bool) -> None:
        await self.end_message()  # only in a damaged recording: one left unfinished
        if fin:
            await self.ws.send(payload, text=text)
            return
        self._fragments, fragments = trio.open_memory_channel[bytes](0)
        self._message_sent = trio.Event()
        self._nursery.start_soon(self._send_fragments, fragments, text)
        await self._fragments.send(payload)

    async def _continue_message(self, payload: bytes, fin: bool) -> None:
        # An empty last fragment is the final frame websockets adds when the message ends.
        if self._fragments is not None and payload:
            await self._fragments.send(payload)
        if fin:
            await self.end_message()

    async def _close(self, payload: bytes) -> None:
        await self.end_message()
        code, reason = close_payload(payload)
        if code is None or not (code in _SENDABLE or 3000 <= code < 5000):
            code = 1000  # websockets sends only codes an endpoint may send
        await self.ws.aclose(code, reason)

    async def end_message(self) -> None:
        """Finish the fragmented message being sent, if any, with its empty final frame.
        Returns once it is sent: a close any sooner would fail the connection (1011)."""
        if self._fragments is not None:
            await self._fragments.aclose()
            self._fragments = None
            await self._message_sent.wait()

    async def _send_fragments(
        self, fragments: trio.MemoryReceiveChannel[bytes], text: bool
    ) -> None:
        # Closed when the send fails: the next fragment's send fails too, not waits forever.
        try:
            with fragments, contextlib.suppress(ConnectionClosed):
                await self.ws.send(fragments, text=text)
        finally:
            self._message_sent.set()
