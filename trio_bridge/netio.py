"""Non-blocking socket I/O for Trio with one await per wait, not per call.

Trio's socket wrappers put a checkpoint in every call; on a relay that forwards many
small messages the scheduler round trips dominate the CPU cost. These helpers try the
system call first and only park in :func:`trio.lowlevel.wait_readable` /
:func:`~trio.lowlevel.wait_writable` when the kernel says ``EAGAIN``. Loops built on them
must still yield now and then (see :class:`Fairness`) so a busy session cannot starve
the others.
"""

from __future__ import annotations

import socket
import struct

import trio

# recv()/send() errors that mean "the peer is gone", as opposed to programming errors.
PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class Fairness:
    """Counts calls that completed without waiting and yields to Trio every ``every``.

    Without this, a loop whose socket is always ready would never reach a checkpoint:
    no other task would run and cancellation would never be delivered.
    """

    __slots__ = ("_every", "_left")

    def __init__(self, every: int = 16) -> None:
        self._every = every
        self._left = every

    async def tick(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._left = self._every
            await trio.lowlevel.checkpoint()

    def waited(self) -> None:
        """The caller just parked in a wait, which is a checkpoint of its own."""
        self._left = self._every


async def recv(sock: socket.socket, max_bytes: int, fairness: Fairness) -> bytes:
    """Receive up to ``max_bytes``; b"" means EOF. Raises the ``PEER_GONE`` errors on reset.

    Returning a fresh ``bytes`` rather than filling a session-owned buffer means an idle
    session holds no buffer at all (thousands of idle sessions are the common case), and
    websockets takes the bytes without another copy.
    """
    while True:
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            fairness.waited()
            continue
        await fairness.tick()
        return data


Bytes = bytes | bytearray | memoryview


async def send_all(sock: socket.socket, data: Bytes, flags: int = 0) -> None:
    """Send every byte of ``data``, waiting for the socket to drain as needed."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view, flags)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def drain_until_eof(sock: socket.socket) -> None:
    """Read and discard until the peer's EOF (or a reset); callers bound the time."""
    while True:
        try:
            if not sock.recv(65536):
                return
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError:
            return


def close_socket(sock: socket.socket) -> None:
    """Close a socket that a Trio task may be waiting on, waking that task first."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def peer_name(sock: socket.socket) -> str:
    """A printable client address for logs: ``host:port``, ``[v6]:port`` or ``unix``."""
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown"
    if sock.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    uid = peer_uid(sock)
    who = f"unix(uid={uid})" if uid is not None else "unix"
    return f"{who}:{addr}" if addr else who


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of a Unix-socket peer, from the kernel (SO_PEERCRED); None elsewhere."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return int(uid)
