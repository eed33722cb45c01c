"""Where listening sockets come from when the bridge binds them itself.

Every listener is a plain, non-blocking stdlib socket in the listening state; the
server does not care whether it was bound here, inherited from systemd or handed in
by an embedding program.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from .config import Address, StartupError, TcpAddress, UnixAddress

BACKLOG = 4096  # the kernel caps this at net.core.somaxconn


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
    return f"unix:{name}"
