"""Byte streams at either end of a session: a plain socket, or a Trio stream (TLS).

The relay only needs "read some bytes", "write all of these" and "close".
:class:`SocketTransport` does that with direct non-blocking system calls, which need not
be checkpoints (see the contract in :mod:`trio_bridge.netio`), and exposes the socket so
the zero-copy path can splice it; :class:`StreamTransport` adapts any
:class:`trio.abc.Stream`, such as a :class:`trio.SSLStream`, whose bytes must pass
through Python anyway.

Both raise the built-in connection errors (``ConnectionResetError``,
``BrokenPipeError``) when the peer is gone, so callers handle one family of errors.
"""

from __future__ import annotations

import contextlib
import socket
from abc import ABC, abstractmethod

import trio

from .netio import Bytes, Fairness, close_socket, recv, send_all


class Transport(ABC):
    #: The plain socket underneath, when bytes can move kernel-to-kernel; else None.
    raw: socket.socket | None = None

    @abstractmethod
    async def recv(self, max_bytes: int) -> bytes:
        """Read up to ``max_bytes``; b"" means end of stream."""

    @abstractmethod
    async def send_all(self, data: Bytes, *, more: bool = False) -> None:
        """Write all of ``data``; ``more`` hints that more follows at once (MSG_MORE)."""

    @abstractmethod
    async def send_eof(self) -> None:
        """Half-close, where the transport supports it; otherwise do nothing."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close without waiting on the peer; safe to call more than once."""


class SocketTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.raw = sock
        self._sock = sock
        self._fairness = Fairness()
        self._drained = False

    async def recv(self, max_bytes: int) -> bytes:
        data = await recv(self._sock, max_bytes, self._fairness, wait_first=self._drained)
        self._drained = 0 < len(data) < max_bytes  # a short read emptied the socket
        return data

    async def send_all(self, data: Bytes, *, more: bool = False) -> None:
        await send_all(self._sock, data, socket.MSG_MORE if more else 0)

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        close_socket(self._sock)


class StreamTransport(Transport):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def recv(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except trio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc.__cause__ or exc)) from exc
        except trio.ClosedResourceError:
            return b""

    async def send_all(self, data: Bytes, *, more: bool = False) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BrokenPipeError(str(exc.__cause__ or exc)) from exc

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_eof()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
