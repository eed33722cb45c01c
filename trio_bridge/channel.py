"""The client side of one connection: a transport, its WebSocket protocol state, ordered writes.

websockets' sans-I/O :class:`~websockets.server.ServerProtocol` decides *what* to send
(handshake responses, frames, pongs, close frames, EOF); this class decides *when*.
Two relay tasks write to the same client (data from the target, pongs and close
replies from the client's own frames), so every write goes through one lock and the
protocol's pending output is taken only while holding it: bytes reach the client in
the order the protocol produced them and a frame is never interleaved with another.
Writes and the lock need not be checkpoints (see the contract in :mod:`trio_bridge.netio`).
"""

from __future__ import annotations

import trio
from websockets.server import ServerProtocol

from .netio import PEER_GONE, Bytes, WriteTurn
from .transport import Transport


class ClientGone(Exception):
    """The client's connection failed (reset, broken pipe): nothing more can be sent to it."""


class ClientChannel:
    def __init__(self, transport: Transport, protocol: ServerProtocol, peer: str) -> None:
        self.transport = transport
        self.protocol = protocol
        self.peer = peer
        self.eof_sent = False
        self.write_turn = WriteTurn()

    async def flush(self) -> None:
        """Send everything the protocol has queued, in order; half-close on its EOF marker.

        With nothing queued this returns at once, without the lock: the task reading
        the client calls it after every read, and must not wait behind a large frame
        going to a slow client, or it would stop reading and stall the upstream too.
        """
        if not self.protocol.writes:
            return
        async with self.write_turn:
            for chunk in self.protocol.data_to_send():
                if chunk:
                    await self.send_raw(chunk)
                elif not self.eof_sent:
                    self.eof_sent = True
                    await self.transport.send_eof()

    async def send_raw(self, data: Bytes, *, more: bool = False) -> None:
        """Write bytes that bypass the protocol object; callers hold the write lock."""
        try:
            await self.transport.send_all(data, more=more)
        except PEER_GONE as exc:
            raise ClientGone(str(exc)) from exc

    async def linger_and_close(self, timeout: float) -> None:
        """Close after our EOF, reading until the client's EOF or ``timeout``.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        an HTTP error response or close frame still in flight. Draining first lets the
        client read what we sent.
        """
        if not self.eof_sent:
            self.eof_sent = True
            await self.transport.send_eof()
        with trio.move_on_after(timeout):
            try:
                while await self.transport.recv(4096):
                    pass
            except OSError:
                pass
        await self.transport.aclose()
