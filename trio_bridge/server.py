"""The accept side: listeners in, sessions out, with connection limits and graceful shutdown.

:class:`Bridge` is also the embedding API (websockify's ``WebSocketProxy``)::

    async with trio.open_nursery() as nursery:
        bridge = await nursery.start(Bridge(config).serve)   # binds config.listen
        ...
        bridge.request_shutdown()

For each connection: read the opening handshake (bounded in time and size), decide
the response, connect to the target, answer 101 and hand over to a
:class:`~trio_bridge.session.Session`. Nothing here touches WebSocket frames.
"""

from __future__ import annotations

import contextlib
import errno
import http
import logging
import socket
import time
from collections.abc import Sequence

import trio
from websockets.http11 import Request, Response

from . import listeners as listeners_mod
from .channel import ClientChannel, ClientGone
from .config import Config
from .handshake import (
    Refusal,
    decide_response,
    new_protocol,
    plain_response,
    receive_request,
    refusal_reason,
)
from .netio import Fairness, close_socket, peer_name
from .observe import ObserverFactory, SessionInfo
from .routing import (
    HttpRefusal,
    HttpResponder,
    StaticTarget,
    TargetResolver,
    is_websocket_upgrade,
)
from .session import INTERNAL_ERROR, Session, SessionStats, new_session_id
from .targets import TargetUnavailable, connect
from .transport import SocketTransport, Transport

log = logging.getLogger("trio_bridge.server")

# accept() errors that mean "out of resources for now", not "the listener is broken".
TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
IGNORED_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
GOING_AWAY = 1001


class Bridge:
    """Serves WebSocket clients on listeners and relays each to ``config.target``."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: TargetResolver | None = None,
        http: HttpResponder | None = None,
        observers: ObserverFactory | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver or StaticTarget(config.target)
        self.http = http
        self.observers = observers
        self.sessions: set[Session] = set()
        self.connections = 0
        self.listen_addresses: list[str] = []
        self._shutdown_requested = trio.Event()
        self._no_connections = trio.Event()
        self._no_connections.set()

    def request_shutdown(self) -> None:
        """Stop accepting; let sessions drain for ``shutdown_grace``, then close them with 1001."""
        self._shutdown_requested.set()

    async def serve(
        self,
        listeners: Sequence[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`request_shutdown` (or cancellation).

        ``listeners`` are listening stream sockets (TCP or Unix); the bridge binds
        ``config.listen`` itself when none are given. They are closed on return.
        """
        if listeners is None:
            listeners = [listeners_mod.bind(self.config.listen, self.config.unix_listen_mode)]
        for listener in listeners:
            listener.setblocking(False)
        self.listen_addresses = [listeners_mod.describe(sock) for sock in listeners]
        limits = self.config.limits
        try:
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(self._accept_all, listeners, connections, accepting)
                log.info(
                    "listening on %s, relaying to %s",
                    ", ".join(self.listen_addresses),
                    self.config.target,
                )
                task_status.started(self)
                await self._shutdown_requested.wait()
                accepting.cancel()
                log.info(
                    "shutting down: %d connection(s) open, waiting up to %g s",
                    self.connections,
                    limits.shutdown_grace,
                )
                with trio.move_on_after(limits.shutdown_grace):
                    await self._no_connections.wait()
                for session in list(self.sessions):
                    session.request_close(GOING_AWAY, "server shutting down")
                with trio.move_on_after(limits.close_timeout + 1):
                    await self._no_connections.wait()
                connections.cancel_scope.cancel()
        finally:
            for listener in listeners:
                close_socket(listener)

    async def _accept_all(
        self,
        listeners: Sequence[socket.socket],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, connections)
        finally:
            # Close as soon as accepting stops, not when draining ends: a connection
            # arriving during shutdown is refused at once instead of waiting in the
            # kernel's queue for a bridge that will never accept it.
            for listener in listeners:
                close_socket(listener)

    async def _accept_loop(self, listener: socket.socket, connections: trio.Nursery) -> None:
        fairness = Fairness()
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                fairness.waited()
                continue
            except OSError as exc:
                if exc.errno in TRANSIENT_ACCEPT_ERRORS:
                    log.error("cannot accept connections: %s; retrying in 100 ms", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in IGNORED_ACCEPT_ERRORS:
                    continue
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.start_soon(self._handle, sock)
            await fairness.tick()

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-accepted connection and return when it ends.

        This is the inetd / systemd ``Accept=yes`` path: the same handshake, limits,
        relay and log line as a connection from :meth:`serve`'s listeners.
        """
        sock.setblocking(False)
        await self._handle(sock)

    async def _handle(self, sock: socket.socket) -> None:
        peer = peer_name(sock)
        transport = self._client_transport(sock)
        if self.connections >= self.config.limits.max_connections:
            await self._refuse_overload(transport, peer)
            return
        if self.connections == 0:
            self._no_connections = trio.Event()
        self.connections += 1
        try:
            await self._serve_connection(transport, peer)
        except ClientGone as exc:
            log.info("client %s: connection failed during the handshake: %s", peer, exc)
        finally:
            await transport.aclose()
            self.connections -= 1
            if self.connections == 0:
                self._no_connections.set()

    def _client_transport(self, sock: socket.socket) -> Transport:
        """How bytes are read from and written to an accepted client connection."""
        return SocketTransport(sock)

    async def _refuse_overload(self, transport: Transport, peer: str) -> None:
        limit = self.config.limits.max_connections
        log.warning("client %s: refused with 503: connection limit (%d) reached", peer, limit)
        response = plain_response(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            f"Too many connections: this bridge serves at most {limit}.\n",
        )
        channel = ClientChannel(transport, new_protocol(self.config), peer)
        with contextlib.suppress(ClientGone):
            await channel.send_raw(response.serialize())
        await channel.linger_and_close(1.0)

    async def _serve_connection(self, transport: Transport, peer: str) -> None:
        config = self.config
        limits = config.limits
        protocol = new_protocol(config)
        channel = ClientChannel(transport, protocol, peer)

        request = await receive_request(channel, limits.handshake_timeout)
        if isinstance(request, Refusal):
            log.info("client %s: %s", peer, request.reason)
            await channel.linger_and_close(limits.close_timeout)
            return

        if self.http is not None and not is_websocket_upgrade(request):
            answer = await self.http.respond(request, peer)
            if answer is not None:
                await self._answer_http(channel, request, answer)
                return

        response = decide_response(protocol, request)
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
            try:
                address = await self.resolver.resolve(request, peer)
            except HttpRefusal as refusal:
                response = protocol.reject(refusal.status, f"{refusal.reason}\n")
                for name, value in refusal.headers:
                    response.headers[name] = value
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            await self._answer_http(channel, request, response)
            return

        stats = SessionStats(new_session_id(), peer, str(address))
        try:
            target = await connect(address, limits.connect_timeout)
        except TargetUnavailable as exc:
            # Accept first so that a browser can show the reason: it never sees HTTP errors.
            protocol.send_response(response)
            protocol.send_close(INTERNAL_ERROR, str(exc))
            await channel.flush()
            log.warning("session %s: client %s: %s", stats.session_id, peer, exc)
            await channel.linger_and_close(limits.close_timeout)
            return

        protocol.send_response(response)
        try:
            await channel.flush()
        except BaseException:
            await target.aclose()
            raise
        log.debug(
            "session %s opened: client=%s path=%s target=%s subprotocol=%s",
            stats.session_id,
            peer,
            request.path,
            address,
            protocol.subprotocol,
        )
        observer = None
        if self.observers is not None:
            info = SessionInfo(
                session_id=stats.session_id,
                client=peer,
                target=stats.target,
                path=request.path,
                subprotocol=protocol.subprotocol,
                started_wall=time.time(),
            )
            observer = self.observers.open(info)
        session = Session(channel, target, config, stats, observer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.info("%s", stats.summary(), extra=stats.journal_fields())

    async def _answer_http(
        self, channel: ClientChannel, request: Request, response: Response
    ) -> None:
        """Send a non-101 response, log it, and close the connection."""
        channel.protocol.send_response(response)
        await channel.flush()
        status = response.status_code
        level = logging.INFO if status < 400 else logging.WARNING
        log.log(
            level,
            "client %s: %s %s -> %d%s",
            channel.peer,
            request.method,
            request.path,
            status,
            f": {refusal_reason(response)}" if status >= 400 else "",
        )
        await channel.linger_and_close(self.config.limits.close_timeout)


async def serve(
    config: Config,
    listeners: Sequence[socket.socket] | None = None,
    *,
    task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`Bridge` for ``config``; ``await nursery.start(serve, config)`` gives it."""
    await Bridge(config).serve(listeners, task_status=task_status)
