"""Sockets the bridge inherits at start: systemd socket activation and inetd style.

Three ways a process can be handed its sockets instead of binding them:

- ``Accept=no`` (the usual ``trio-bridge.socket``): systemd passes one or more
  *listening* sockets (``LISTEN_FDS``, from fd 3 on), each with a
  ``FileDescriptorName=``. The bridge serves them all, whatever their family
  (IPv4, IPv6, Unix), and binds nothing itself.
- ``Accept=yes`` (``trio-bridge-accept.socket``): systemd accepts and passes one
  *connected* socket, named ``connection``; the process serves it and exits.
- inetd style (``StandardInput=socket``, ``systemd-socket-activate --inetd``, inetd's
  ``nowait``): the connection is on stdin *and* stdout. Requiring both to be the same
  socket keeps a program that merely talks to us over a socketpair (libuv and others
  create stdio that way) from being mistaken for an inetd client.

The environment is read with systemd-python's ``listen_fds_with_names()`` (which also
checks ``LISTEN_PID`` and unsets the variables so no child inherits them), never by
hand. systemd-python is imported only when systemd actually passed sockets, so a bridge
started by hand neither needs nor pays for it.

A socket's *role* comes from its name: ``ws`` (or no name), ``wss`` (served like ``ws``
with ``--cert``), ``metrics``. A caller lists the roles it serves in ``serve_roles``;
a socket of any other role fails with a clear message instead of sitting idle.
"""

from __future__ import annotations

import enum
import os
import socket
import stat
from collections.abc import Collection
from dataclasses import dataclass, field

from .errors import StartupError
from .listeners import describe


class ActivationError(StartupError):
    """The sockets systemd or inetd passed cannot be served; the message names the fd."""


class Role(enum.Enum):
    """What an inherited socket is for, from its ``FileDescriptorName=``."""

    WS = "ws"  # plain WebSocket listener (also every unnamed socket)
    WSS = "wss"  # TLS WebSocket listener
    METRICS = "metrics"  # Prometheus-style metrics endpoint
    CONNECTION = "connection"  # one accepted connection (Accept=yes, inetd)


NOT_SUPPORTED_YET = {
    Role.WSS: "TLS (wss) listeners are not served by this program",
    Role.METRICS: "the metrics endpoint is not served by this program",
}

# The names sd_listen_fds_with_names() reports for a socket nobody named: "unknown"
# without LISTEN_FDNAMES (systemd-socket-activate without --fdname), and the socket
# unit's own name when FileDescriptorName= is unset ("trio-bridge.socket").
UNNAMED = "unknown"


@dataclass
class InheritedSockets:
    """Everything handed over at start; ``connection`` excludes ``listeners``."""

    origin: str  # "systemd" or "inetd", for log lines
    listeners: dict[Role, list[socket.socket]] = field(default_factory=dict)
    connection: socket.socket | None = None
    descriptions: list[str] = field(default_factory=list)  # "fd 3 (ws) 127.0.0.1:6080"

    def listening(self, role: Role = Role.WS) -> list[socket.socket]:
        return self.listeners.get(role, [])

    def __str__(self) -> str:
        return f"the sockets {self.origin} passed: {', '.join(self.descriptions)}"


def inherited_sockets(serve_roles: Collection[Role] = (Role.WS,)) -> InheritedSockets | None:
    """The sockets this process was started with, or None when it should bind its own.

    ``serve_roles`` are the listener roles the caller can serve; any other named
    listener is an :class:`ActivationError` rather than a socket silently left idle.
    """
    fds = _systemd_fds()
    if fds:
        return _from_systemd(fds, serve_roles)
    connection = _inetd_connection()
    if connection is not None:
        return InheritedSockets("inetd", connection=connection, descriptions=["stdin"])
    return None


def _systemd_fds() -> dict[int, str]:
    """{fd: FileDescriptorName} for this process, from systemd-python.

    Without that module the variables are only glanced at, to fail clearly when systemd
    did pass sockets instead of binding a port systemd already holds.
    """
    try:
        import systemd.daemon
    except ImportError:
        if os.environ.get("LISTEN_PID") == str(os.getpid()) and "LISTEN_FDS" in os.environ:
            raise ActivationError(
                "systemd passed sockets (LISTEN_FDS) but the systemd-python module is not "
                "installed: pip install 'trio-bridge[systemd]'"
            ) from None
        return {}
    try:
        fds: dict[int, str] = systemd.daemon.listen_fds_with_names(unset_environment=True)
    except OSError as exc:
        raise ActivationError(
            f"cannot read the sockets systemd passed: {exc.strerror or exc} "
            "(does LISTEN_FDNAMES name every fd of LISTEN_FDS?)"
        ) from exc
    return fds


def _from_systemd(fds: dict[int, str], serve_roles: Collection[Role]) -> InheritedSockets:
    inherited = InheritedSockets("systemd")
    for fd, name in sorted(fds.items()):
        sock, role = adopt(fd, name, serve_roles)
        if role is Role.CONNECTION:
            if len(fds) > 1:
                raise ActivationError(
                    f"fd {fd} is an accepted connection (Accept=yes), but systemd passed "
                    f"{len(fds) - 1} other socket(s) too; an Accept=yes service gets only one"
                )
            inherited.connection = sock
            inherited.descriptions.append(f"fd {fd} (connection)")
        else:
            inherited.listeners.setdefault(role, []).append(sock)
            inherited.descriptions.append(f"fd {fd} ({role.value}) {describe(sock)}")
    return inherited


def adopt(fd: int, name: str, serve_roles: Collection[Role]) -> tuple[socket.socket, Role]:
    """Wrap ``fd`` in a socket object after checking it can serve the role ``name`` gives."""
    label = f"fd {fd}" if _unnamed(name) else f"fd {fd} (FileDescriptorName={name})"
    role = _role(label, name, serve_roles)
    kind = _socket_kind(fd)
    if kind is None:
        raise ActivationError(f"{label} is not a socket ({_file_kind(fd)})")
    family, type_, listening = kind
    if type_ != socket.SOCK_STREAM:
        raise ActivationError(f"{label} is not a stream socket (socket type {type_})")
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise ActivationError(f"{label} has address family {family}, not IPv4, IPv6 or Unix")
    if role is None:  # unnamed: a listener, or the connection of an Accept=yes service
        role = Role.WS if listening else Role.CONNECTION
    if role is Role.CONNECTION and listening:
        raise ActivationError(f"{label} is a listening socket, not an accepted connection")
    if role is not Role.CONNECTION and not listening:
        raise ActivationError(
            f"{label} is not a listening stream socket (it is already connected; "
            "for Accept=yes use trio-bridge-accept.socket)"
        )
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock, role


def _unnamed(name: str) -> bool:
    return name in (UNNAMED, "") or name.endswith(".socket")


def _role(label: str, name: str, serve_roles: Collection[Role]) -> Role | None:
    if _unnamed(name):
        return None
    try:
        role = Role(name)
    except ValueError:
        known = ", ".join(repr(r.value) for r in Role if r is not Role.CONNECTION)
        raise ActivationError(
            f"{label}: unknown socket role {name!r}; name it one of {known} "
            "or leave FileDescriptorName= unset for plain WebSocket"
        ) from None
    if role is not Role.CONNECTION and role not in serve_roles:
        reason = NOT_SUPPORTED_YET.get(role, f"{role.value} sockets are not served")
        raise ActivationError(f"{label}: {reason}")
    return role


def _socket_kind(fd: int) -> tuple[int, int, bool] | None:
    """(family, type, listening) of the socket at ``fd``; None when it is no socket."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
    except OSError as exc:
        raise ActivationError(f"fd {fd} is not open ({exc.strerror})") from exc
    # A temporary object on a duplicate: querying must not close or adopt ``fd``.
    with socket.socket(fileno=os.dup(fd)) as probe:
        listening = bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        return int(probe.family), int(probe.type), listening


def _file_kind(fd: int) -> str:
    mode = os.fstat(fd).st_mode
    for test, kind in (
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return kind
    return f"file mode {stat.filemode(mode)}"


def _inetd_connection() -> socket.socket | None:
    """The connection on stdin/stdout when started inetd style, else None.

    The socket moves to a fresh fd and stdin/stdout (and stderr, if it is the same
    socket, as under inetd) are pointed at /dev/null: the connection must have one
    owner, or closing it would not end it, and log lines must never reach the client.
    """
    try:
        st_in, st_out = os.fstat(0), os.fstat(1)
    except OSError:
        return None
    same = (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
    if not (stat.S_ISSOCK(st_in.st_mode) and same):
        return None
    kind = _socket_kind(0)
    if kind is None or kind[1] != socket.SOCK_STREAM or kind[2]:
        return None
    sock = socket.socket(fileno=os.dup(0))
    on_socket = [0, 1]
    try:
        st_err = os.fstat(2)
        if (st_err.st_dev, st_err.st_ino) == (st_in.st_dev, st_in.st_ino):
            on_socket.append(2)
    except OSError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in on_socket:
        os.dup2(null, fd)
    os.close(null)
    sock.setblocking(False)
    return sock


__all__ = [
    "ActivationError",
    "InheritedSockets",
    "Role",
    "inherited_sockets",
]
