"""Where sockets come from: listeners the bridge binds itself, and the accept loop.

Every listener is a plain, non-blocking stdlib socket in the listening state; the
server does not care whether it was bound here, inherited from systemd or handed in
by an embedding program.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable

import trio

from .addresses import Address, TcpAddress, UnixAddress
from .errors import StartupError
from .netio import Fairness, accept

BACKLOG = 4096  # the kernel caps this at net.core.somaxconn

# accept() errors that mean "out of resources for now", not "the listener is broken",
# and those that concern only the connection being accepted (trio's lists).
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ONE_CONNECTION_FAILED = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
ACCEPT_RETRY = 0.1  # seconds


async def accept_forever(
    listener: socket.socket,
    handle: Callable[[socket.socket], None],
    out_of_resources: Callable[[OSError], None],
) -> None:
    """Accept connections until cancelled, handing each (non-blocking) to ``handle``.

    Out of file descriptors or memory, it calls ``out_of_resources`` and retries every
    :data:`ACCEPT_RETRY` seconds: the process keeps serving its open connections and
    accepts again once some close. Any other error means the listener itself is broken
    and is raised.

    Not :func:`trio.serve_listeners`, whose policy this follows: that one logs an ERROR
    at every retry (ten lines a second while out of descriptors; here the caller rate-
    limits) and passes through a checkpoint per accepted connection, where this loop
    accepts a burst with one wakeup and yields every few connections (:class:`Fairness`).
    """
    fairness = Fairness()
    while True:
        try:
            sock = await accept(listener, fairness)
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                out_of_resources(exc)
                await trio.sleep(ACCEPT_RETRY)
                continue
            if exc.errno in ONE_CONNECTION_FAILED:
                continue
            raise
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handle(sock)


class ListenError(StartupError):
    """A socket could not be bound; the message names the address and the cause."""


def bind(address: Address, unix_mode: int | None = None) -> socket.socket:
    try:
        if isinstance(address, UnixAddress):
            sock = _bind_unix(address.path, unix_mode)
        else:
            sock = _bind_tcp(address)
    except ListenError:
        raise
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _bind_tcp(address: TcpAddress) -> socket.socket:
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, mode: int | None) -> socket.socket:
    # A socket file left by a previous run would make bind() fail; anything that is
    # not a socket is the operator's file and is never removed.
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    """The address a listener serves, for logs and for tests that bind port 0."""
    name = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    if isinstance(name, bytes):  # an abstract address: a NUL, then the name
        return f"unix:@{name[1:].decode(errors='replace')}"
    return f"unix:{name}"
