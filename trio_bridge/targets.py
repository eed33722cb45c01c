"""Connecting to the configured target, with errors a person can act on.

The bridge only ever connects to an address the operator configured (later: one a
token plugin vouches for); nothing here reads client input. A failure becomes a
:class:`TargetUnavailable` whose message is shown to the client in the WebSocket close
reason and written to the log, so both say the same thing.
"""

from __future__ import annotations

import errno
import socket

import trio

from .addresses import Address, TcpAddress, UnixAddress
from .tls import TargetTls, TlsFailure
from .transport import SocketTransport, StreamTransport


class TargetUnavailable(Exception):
    """The target could not be reached; ``str()`` is a one-line reason naming it."""


def _root_errors(exc: BaseException) -> list[BaseException]:
    """The leaf errors behind Trio's "all attempts to connect failed"."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return list(cause.exceptions)
    return [exc]


def describe_failure(target: Address, exc: BaseException) -> str:
    errors = _root_errors(exc)
    codes = {getattr(e, "errno", None) for e in errors}
    if isinstance(exc, socket.gaierror):
        return f"target {target} could not be resolved ({exc.strerror})"
    if errno.ECONNREFUSED in codes:
        return f"target {target} refused the connection"
    if errno.ENOENT in codes:
        return f"target {target} does not exist"
    if errno.EACCES in codes or errno.EPERM in codes:
        return f"target {target} is not accessible (permission denied)"
    if codes & {errno.ENETUNREACH, errno.EHOSTUNREACH}:
        return f"target {target} is unreachable"
    detail = getattr(errors[-1], "strerror", None) or str(errors[-1])
    return f"target {target} could not be reached ({detail})"


async def connect(
    target: Address, timeout: float, *, tls: TargetTls | None = None
) -> SocketTransport | StreamTransport:
    """Open a stream to ``target`` over a non-blocking stdlib socket.

    Trio's ``open_tcp_stream`` does name resolution and happy eyeballs (``localhost``
    may resolve to ``::1`` first while a VNC server listens on 127.0.0.1 only); the
    connected socket is then detached so the relay can drive it directly.

    With ``tls`` (``--ssl-target``) the TLS handshake runs within the same ``timeout``
    and the result is a :class:`StreamTransport` (no zero-copy: bytes pass through
    Python to be encrypted anyway).
    """
    try:
        with trio.fail_after(timeout):
            if isinstance(target, TcpAddress):
                stream = await trio.open_tcp_stream(target.host, target.port)
                trio_sock = stream.socket
            else:
                trio_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await trio_sock.connect(target.path)
                except BaseException:
                    trio_sock.close()
                    raise
            if tls is not None:
                try:
                    return StreamTransport(await tls.wrap(trio.SocketStream(trio_sock), target))
                except TlsFailure as exc:
                    raise TargetUnavailable(f"target {target}: {exc}") from exc
    except trio.TooSlowError:
        raise TargetUnavailable(f"target {target} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise TargetUnavailable(describe_failure(target, exc)) from exc
    except UnicodeError:
        # The resolver's IDNA codec refuses the name (a label over 63 characters, ...):
        # a name from a token plugin is as unresolvable as one the DNS does not know.
        raise TargetUnavailable(
            f"target {target} could not be resolved (not a valid host name)"
        ) from None
    sock = socket.socket(fileno=trio_sock.detach())
    if isinstance(target, TcpAddress):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SocketTransport(sock)


__all__ = ["Address", "TargetUnavailable", "UnixAddress", "connect"]
