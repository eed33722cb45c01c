"""Checkpoint-free I/O: the one module where an ``await`` may return without a checkpoint.

Trio's rule is that every async call is a checkpoint: it may switch tasks, and it
delivers cancellation. Trio's socket wrappers keep it with a scheduler round trip per
call, and a relay forwarding many small messages is then mostly scheduler (with one
wake-up per wait, as here, Trio's scheduler is still a quarter of a round trip's CPU:
docs/performance.md). The relay breaks the rule here, and only here, under this contract:

- **Checkpoint-free.** :func:`recv`, :func:`send_all`, :func:`splice_all`,
  :func:`accept` and :func:`sendfile` try the system call first and return without
  yielding when the kernel does not say ``EAGAIN``; :class:`WriteTurn` takes a free
  lock without yielding. Sockets are non-blocking, so none of them ever blocks the
  thread.
- **Every wait is a checkpoint.** They park only in ``trio.lowlevel.wait_readable`` /
  ``wait_writable`` or in a contended lock's ``acquire``, which let other tasks run and
  raise ``Cancelled``.
- **Fairness bounds the rest.** A loop whose socket may always be ready must tick a
  :class:`Fairness` once per pass: it yields, a full checkpoint, after every 16 passes
  that did not wait. Passes must be small: :func:`recv` and :func:`drain_until_eof`
  tick per read, the session's upstream per frame it parsed (one read may hold
  thousands), the splice loop per chunk; deflating a chunk is not small, so the
  session's compressed downstream yields after every one. Writes do not tick: each
  follows a read or a frame that ticked, and ends once its bytes are out. So a busy
  session does at most 16 small passes between checkpoints, and other sessions and
  cancellation get their turn.
- **Who relies on it.** What is built on these inherits the contract: the transports
  (:mod:`trio_bridge.transport`), the client's ordered writes
  (:mod:`trio_bridge.channel`), the session's relay loops (:mod:`trio_bridge.session`)
  and the splice loop (:mod:`trio_bridge.zerocopy`, one tick per chunk); the accept
  loop (:mod:`trio_bridge.listeners`) and the file server (:mod:`trio_bridge.web`) tick
  a :class:`Fairness` of their own through :func:`accept` and :func:`sendfile`.

tests/test_checkpoints.py holds the relay to it: a session flooding either way leaves
another session's round trips prompt, and a bridge cancelled mid-flood stops at once.
(With a tick per read only, a client flooding tiny frames held another session's round
trip for 12 s, and a deflated flood from the target kept 30 round trips from finishing
in 15 s.)
"""

from __future__ import annotations

import os
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


async def recv(
    sock: socket.socket, max_bytes: int, fairness: Fairness, *, wait_first: bool = False
) -> bytes:
    """Receive up to ``max_bytes``; b"" means EOF. Raises the ``PEER_GONE`` errors on reset.

    ``wait_first``: the caller knows the socket is empty (its last read came back
    short), so wait rather than spend a system call and an exception learning that again.
    Returning a fresh ``bytes`` rather than filling a session-owned buffer means an idle
    session holds no buffer at all (thousands of idle sessions are the common case), and
    websockets takes the bytes without another copy.
    """
    if wait_first:
        await trio.lowlevel.wait_readable(sock)
        fairness.waited()
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


SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


async def splice_all(pipe_read: int, sock: socket.socket, count: int) -> None:
    """Move ``count`` bytes from a pipe to ``sock`` with splice(2), waiting for the socket
    to drain as needed; raises the ``PEER_GONE`` errors."""
    while count:
        try:
            count -= os.splice(pipe_read, sock.fileno(), count, flags=SPLICE_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def drain_until_eof(sock: socket.socket) -> None:
    """Read and discard until the peer's EOF (or a reset); callers bound the time."""
    fairness = Fairness()  # or a peer that never stops sending would keep that bound away
    try:
        while await recv(sock, 65536, fairness):
            pass
    except OSError:
        return


class WriteTurn:
    """``async with write_turn:`` holds a write lock, without a scheduler round trip when
    nobody else holds it (``trio.Lock.acquire`` always yields, which costs a wakeup per
    relayed message). A contended turn waits in FIFO order, a checkpoint.

    ``torn`` becomes True when a turn ends by an exception (a cancelled or failed
    write): the client may have part of a frame, so no further frame, not even a
    close frame, can be framed after it.
    """

    __slots__ = ("_lock", "torn")

    def __init__(self) -> None:
        self._lock = trio.StrictFIFOLock()
        self.torn = False

    async def __aenter__(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.torn = True
        self._lock.release()


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


async def accept(listener: socket.socket, fairness: Fairness) -> socket.socket:
    """The next connection (still blocking: the caller sets it up); raises accept(2)'s
    errors, which the caller sorts into retry or give up.

    A burst of queued connections is taken with one wake-up, a tick per connection.
    """
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            fairness.waited()
            continue
        await fairness.tick()
        return sock


async def sendfile(
    sock: socket.socket, fd: int, offset: int, count: int, fairness: Fairness
) -> int:
    """``os.sendfile`` on a non-blocking socket, waiting while it is full; the bytes
    sent (0: the file ends before ``offset``)."""
    while True:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, count)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            fairness.waited()
            continue
        await fairness.tick()
        return sent
