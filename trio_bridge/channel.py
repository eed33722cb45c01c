"""The client side of one connection: a socket, its WebSocket protocol state, and ordered writes.

websockets' sans-I/O :class:`~websockets.server.ServerProtocol` decides *what* to send
(handshake responses, frames, pongs, close frames, EOF); this class decides *when*.
Two relay tasks write to the same client (data from the target, pongs and close
replies from the client's own frames), so every write goes through one lock and the
protocol's pending output is taken only while holding it: bytes reach the client in
the order the protocol produced them and a frame is never interleaved with another.
"""

from __future__ import annotations

import contextlib
import socket

import trio
from websockets.server import ServerProtocol

from .netio import PEER_GONE, Fairness, close_socket, recv_into, send_all


class ClientGone(Exception):
    """The client's socket failed (reset, broken pipe): nothing more can be sent to it."""


class ClientChannel:
    def __init__(self, sock: socket.socket, protocol: ServerProtocol, peer: str) -> None:
        self.sock = sock
        self.protocol = protocol
        self.peer = peer
        self.eof_sent = False
        self._write_lock = trio.StrictFIFOLock()

    async def flush(self) -> None:
        """Send everything the protocol has queued, in order; half-close on its EOF marker."""
        lock = self._write_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # the common case: no await, no scheduler round trip
        try:
            for chunk in self.protocol.data_to_send():
                if chunk:
                    await self.send_raw(chunk)
                elif not self.eof_sent:
                    self.eof_sent = True
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_WR)
        finally:
            lock.release()

    async def send_raw(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Write bytes that bypass the protocol object; callers hold the write lock."""
        try:
            await send_all(self.sock, data, flags)
        except PEER_GONE as exc:
            raise ClientGone(str(exc)) from exc

    @property
    def write_lock(self) -> trio.StrictFIFOLock:
        return self._write_lock

    async def linger_and_close(self, timeout: float) -> None:
        """Close after our EOF, reading until the client's EOF or ``timeout``.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        an HTTP error response or close frame still in flight. Draining first lets the
        client read what we sent.
        """
        if not self.eof_sent:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.eof_sent = True
        scratch = memoryview(bytearray(4096))
        fairness = Fairness()
        with trio.move_on_after(timeout):
            try:
                while await recv_into(self.sock, scratch, fairness):
                    pass
            except OSError:
                pass
        close_socket(self.sock)
