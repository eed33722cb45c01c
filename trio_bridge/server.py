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

import dataclasses
import http
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import trio
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from . import listeners as listeners_mod
from . import proxy_header
from .addresses import Address
from .auth import gates_for
from .channel import ClientChannel, ClientGone
from .config import Config
from .errors import ConfigError
from .forwarded import HEADERS as FORWARDED_HEADERS
from .forwarded import ForwardedError, forwarded_client
from .handshake import (
    HandshakeFailure,
    Refusal,
    decide_response,
    new_protocol,
    plain_response,
    receive_request,
    refusal_reason,
)
from .heartbeat import Heartbeats
from .limits import AddressLimiter, Handshake, HandshakeBudget, Networks, client_ip
from .listeners import ACCEPT_RETRY, accept_forever
from .logs import RateLimitedLog, escape
from .metrics import BridgeMetrics
from .netio import close_socket, drain_until_eof, peer_name, peer_uid
from .observe import ObserverFactory, SessionInfo, SessionObserver
from .proxy_header import ProxyHeaderError
from .request_target import redact
from .routing import (
    HttpRefusal,
    HttpResponder,
    RequestGate,
    TargetResolver,
    is_websocket_upgrade,
)
from .session import INTERNAL_ERROR, Session, SessionStats, fit_reason, new_session_id
from .targets import TargetUnavailable, connect
from .tls import ServerTls, TargetTls, TlsFailure, client_info, sniff_tls, sniff_tls_now
from .tokens import resolver_for
from .transport import SocketTransport, StreamTransport, Transport
from .web import FileResponse, HeadResponse, send_file

log = logging.getLogger("trio_bridge.server")

GOING_AWAY = 1001
# A refused connection lingers (so its answer is not lost to a reset) this long, and
# only while fewer than this many do; beyond that it is closed at once.
REFUSAL_LINGER = 0.25
MAX_LINGERING_REFUSALS = 64


@dataclass
class Client:
    """Who a connection serves: its TCP peer, or the client a trusted proxy names
    (docs/scaling.md). ``name`` is what every log line, the session record and the
    gates see; ``address`` (an IP, or ``uid:N`` for a Unix-socket peer) is what
    ``--proxy-protocol``/``--trusted-proxy`` are asked about and per-address limits
    count; ``via`` is the proxy's own address when a proxy named the client."""

    name: str
    address: str | None
    via: str | None = None
    awaiting_header: bool = False  # for the log line of a handshake that timed out

    def proxied_by(self, address: str, name: str) -> None:
        self.via = self.via or self.name
        self.address, self.name = address, name


class Bridge:
    """Serves WebSocket clients on listeners and relays each to ``config.target``."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: TargetResolver | None = None,
        http: HttpResponder | None = None,
        observers: ObserverFactory | None = None,
        metrics: BridgeMetrics | None = None,
        gates: Sequence[RequestGate] | None = None,
        address_limits: AddressLimiter | None = None,
    ) -> None:
        """``address_limits``: instead of this bridge's own count per address (a
        ``--workers`` worker counts in the main process)."""
        self.config = config
        if resolver is None:
            resolver = resolver_for(config)  # the fixed target, or token routing
            if resolver is None:
                raise ConfigError("no target: give Config.target, Config.tokens or a resolver")
        self.resolver = resolver
        # How request paths appear in logs and recordings: without the secrets the
        # resolver reads from them (query values by default; a path token under
        # --token-from path).
        self.redact_path: Callable[[str], str] = getattr(resolver, "redact_path", redact)
        # Security components (docs/security.md); gates run before the resolver.
        self.gates = list(gates) if gates is not None else gates_for(config)
        self.tls = ServerTls(config.tls) if config.tls is not None else None
        self.target_tls = TargetTls(config.target_tls) if config.target_tls is not None else None
        self.address_limits = address_limits or AddressLimiter.for_config(config)
        self.proxy_protocol = Networks.parse(config.proxy_protocol, "--proxy-protocol")
        self.trusted_proxies = Networks.parse(config.trusted_proxies, "--trusted-proxy")
        self.metrics = metrics or BridgeMetrics(process=False)
        self.http = http
        self.observers = observers
        self.sessions: set[Session] = set()
        self.connections = 0
        self.listen_addresses: list[str] = []
        limits = config.limits
        self._handshakes = HandshakeBudget(limits.max_handshakes, limits.handshake_timeout)
        self._heartbeats = Heartbeats()
        self._lingering = 0
        self._refusals = RateLimitedLog(
            log, lambda key, n, s: f"{n} more connections refused ({key}) in the last {s:g} s"
        )
        self._handshake_log = RateLimitedLog(
            log,
            lambda key, n, s: f"{n} more handshakes ended ({key}) in the last {s:g} s",
            level=logging.INFO,
        )
        self._proxy_log = RateLimitedLog(
            log, lambda key, n, s: f"{n} more connections with {key} in the last {s:g} s"
        )
        self._target_log = RateLimitedLog(
            log,
            lambda key, n, s: f"{n} more sessions could not reach target {key} in the last {s:g} s",
        )
        self._shutdown_requested = trio.Event()
        self._skip_grace = False
        self._grace: trio.CancelScope | None = None  # the drain, once it has begun
        self._no_connections = trio.Event()
        self._no_connections.set()

    def request_shutdown(self, *, now: bool = False) -> None:
        """Stop accepting; let sessions drain for ``shutdown_grace``, then close them with 1001.

        ``now=True`` (a second SIGTERM/SIGINT) skips the grace, or what is left of it.
        """
        self._shutdown_requested.set()
        if now:
            self._skip_grace = True
            if self._grace is not None:
                self._grace.cancel()

    def reload_hooks(self) -> list[Callable[[], Awaitable[None]]]:
        """SIGHUP hooks: re-read certificates, token files, keys and credentials.

        One per component with a ``reload()``; each raises (keeping its old state) when
        its files are unusable. Open sessions are untouched; new connections see the
        new state.
        """
        components = [self.tls, self.target_tls, self.resolver, *self.gates]
        hooks: list[Callable[[], Awaitable[None]]] = []
        for component in components:
            reload = getattr(component, "reload", None)
            if callable(reload):

                async def hook(reload: Callable[[], object] = reload) -> None:
                    reload()

                hook.__qualname__ = f"{type(component).__name__}.reload"
                hooks.append(hook)
        return hooks

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
                connections.start_soon(self._heartbeats.run)
                connections.start_soon(self._accept_all, listeners, connections, accepting)
                log.info(
                    "listening on %s, relaying to %s",
                    ", ".join(self.listen_addresses),
                    self.config.target or self.resolver,
                )
                task_status.started(self)
                await self._shutdown_requested.wait()
                accepting.cancel()
                log.info(
                    "shutting down: %d connection(s) open, waiting up to %g s",
                    self.connections,
                    limits.shutdown_grace,
                )
                grace = 0 if self._skip_grace else limits.shutdown_grace
                with trio.move_on_after(grace) as self._grace:
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
        def out_of_resources(exc: OSError) -> None:
            self._refusals.log(
                "accept failed",
                "cannot accept connections: %s; retrying every %g s",
                exc.strerror,
                ACCEPT_RETRY,
            )

        def handle(sock: socket.socket) -> None:
            connections.start_soon(self._handle, sock)

        await accept_forever(listener, handle, out_of_resources)

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-accepted connection and return when it ends.

        This is the inetd / systemd ``Accept=yes`` path: the same handshake, limits,
        relay and log line as a connection from :meth:`serve`'s listeners.
        """
        sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats.run)
            await self._handle(sock)
            nursery.cancel_scope.cancel()

    async def _handle(self, sock: socket.socket) -> None:
        """One accepted connection, from admission to close: the fault boundary.

        Whatever fails while this connection is served (a bug, a plugin, a file system
        error) ends this connection only: it is logged once with an incident id, the
        client gets 500 (before the upgrade) or close 1011 (after it), and its socket
        is closed. Only cancellation and BaseExceptions pass through.
        """
        try:
            await self._admit_and_serve(sock)
        except Exception as exc:  # raised before a channel existed: nothing to answer
            await self._internal_error(None, peer_name(sock), exc)
        finally:
            close_socket(sock)

    async def _admit_and_serve(self, sock: socket.socket) -> None:
        peer = peer_name(sock)
        uid = peer_uid(sock)
        client = Client(peer, client_ip(sock) if uid is None else f"uid:{uid}")
        # Proxies that name their clients are exempt here: their clients are admitted
        # once they are known (after the PROXY header, or after the request).
        admission = await self.address_limits.admit_connection(sock, peer)  # logs refusals
        if isinstance(admission, HttpRefusal):
            self.metrics.handshake_failed(HandshakeFailure.ADDRESS_LIMIT)
            await self._refuse(sock, admission)
            return
        limit = self.config.limits.max_connections
        if self.connections >= limit and not self._handshakes.evict_oldest():
            admission.release()
            self.metrics.handshake_failed(HandshakeFailure.CONNECTION_LIMIT)
            self._refusals.log(
                "connection_limit",
                "client %s: refused with 503: connection limit (%d) reached",
                peer,
                limit,
            )
            reason = f"Too many connections: this bridge serves at most {limit}."
            await self._refuse(sock, HttpRefusal(503, reason))
            return
        if self.connections == 0:
            self._no_connections = trio.Event()
        self.connections += 1
        channel: ClientChannel | None = None
        try:
            with admission, ExitStack() as admissions, self._handshakes.enter() as handshake:
                # One budget for the PROXY header, TLS and the HTTP request together.
                if await self._proxy_protocol(sock, client, admissions):
                    transport = await self._client_transport(sock, client.name, handshake)
                    if transport is not None:
                        channel = ClientChannel(transport, new_protocol(self.config), client.name)
                        await self._serve_connection(channel, handshake, client, admissions)
            if handshake.scope.cancelled_caught:
                self._handshake_ended(handshake, client)
        except (ClientGone, TlsFailure) as exc:
            self.metrics.handshake_failed(
                HandshakeFailure.CLIENT_GONE
                if isinstance(exc, ClientGone)
                else HandshakeFailure.TLS
            )
            self._handshake_log.log(
                str(exc), "client %s: connection failed during the handshake: %s", client.name, exc
            )
        except Exception as exc:
            await self._internal_error(channel, client.name, exc)
        finally:
            if channel is not None:
                with trio.CancelScope(shield=True):
                    await channel.transport.aclose()
            close_socket(sock)
            self.connections -= 1
            if self.connections == 0:
                self._no_connections.set()

    async def _proxy_protocol(
        self, sock: socket.socket, client: Client, admissions: ExitStack
    ) -> bool:
        """Read the PROXY header a ``--proxy-protocol`` peer must send, and admit the
        client it names; refuse a header from anyone else. False: refused and logged.

        A peer that must send a header and sends none or a broken one is closed without
        an answer: what it sent is not HTTP, so nothing in HTTP can reach its client.
        """
        if client.address not in self.proxy_protocol:
            return not (self.proxy_protocol and await self._refused_stray_header(sock, client))
        client.awaiting_header = True
        try:
            header = await proxy_header.receive(sock)
        except ProxyHeaderError as exc:
            self.metrics.handshake_failed(HandshakeFailure.MALFORMED)
            self._proxy_log.log(
                "no valid PROXY header",
                "client %s: closed: no valid PROXY protocol header (required from "
                "--proxy-protocol networks): %s",
                client.name,
                exc,
            )
            return False
        client.awaiting_header = False
        if header.source is None:  # LOCAL (the proxy's health check) or no address
            return True
        host, port = header.source
        client.proxied_by(host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        refusal = await self._admit(client, admissions)
        if refusal is not None:
            await self._refuse(sock, refusal)
            return False
        return True

    async def _refused_stray_header(self, sock: socket.socket, client: Client) -> bool:
        """Refuse a PROXY header from outside ``--proxy-protocol`` (True: refused, logged):
        believed, it would let anyone pose as any address. The first bytes are peeked,
        so a client without one is served as ever."""
        if not await proxy_header.opens_with_header(sock):
            return False
        self.metrics.handshake_failed(HandshakeFailure.MALFORMED)
        self._proxy_log.log(
            "a PROXY header from outside --proxy-protocol",
            "client %s: refused with 400: a PROXY protocol header from an address "
            "outside --proxy-protocol",
            client.name,
        )
        reason = "PROXY protocol headers are not accepted from your address."
        await self._refuse(sock, HttpRefusal(400, reason), plain=True)
        return True

    async def _admit(self, client: Client, admissions: ExitStack) -> HttpRefusal | None:
        """Count the connection under the address a proxy named; held to its end."""
        admission = await self.address_limits.admit_client(client.address, client.name)
        if isinstance(admission, HttpRefusal):
            self.metrics.handshake_failed(HandshakeFailure.ADDRESS_LIMIT)
            return admission
        admissions.enter_context(admission)
        return None

    def _handshake_ended(self, handshake: Handshake, client: Client) -> None:
        """Log a handshake that ran out of time or was evicted for a newer one."""
        if handshake.evicted:
            self.metrics.handshake_failed(HandshakeFailure.EVICTED)
            self._handshake_log.log(
                "evicted",
                "client %s: handshake not completed, closed to make room for a new "
                "connection (%d handshakes in progress at most)",
                client.name,
                self._handshakes.limit,
            )
        else:
            self.metrics.handshake_failed(HandshakeFailure.TIMEOUT)
            self._handshake_log.log(
                "timeout",
                "client %s: %s within %g s",
                client.name,
                "no PROXY protocol header" if client.awaiting_header else "handshake not completed",
                handshake.timeout,
            )

    async def _internal_error(
        self, channel: ClientChannel | None, peer: str, exc: Exception
    ) -> None:
        """The end of a connection whose handling raised: log it, tell the client, close."""
        incident = secrets.token_hex(4)
        log.error(
            "client %s: internal error (incident %s); this connection is closed, the "
            "bridge carries on",
            peer,
            incident,
            exc_info=exc,
        )
        self.metrics.handshake_failed(HandshakeFailure.INTERNAL_ERROR)
        if channel is None:
            return
        protocol = channel.protocol
        timeout = self.config.limits.close_timeout
        try:
            with trio.move_on_after(timeout):
                if protocol.state is State.CONNECTING and not channel.eof_sent:
                    response = plain_response(
                        http.HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"Internal error (incident {incident}).\n",
                    )
                    await channel.send_raw(response.serialize())
                elif protocol.state is State.OPEN:
                    protocol.send_close(INTERNAL_ERROR, f"internal error (incident {incident})")
                    await channel.flush()
                await channel.linger_and_close(timeout)
        except Exception:
            # The connection may be what failed; it is closed by the caller anyway.
            log.debug("client %s: could not report incident %s", peer, incident, exc_info=True)

    async def _client_transport(
        self, sock: socket.socket, peer: str, handshake: Handshake
    ) -> Transport | None:
        """How bytes are read from and written to an accepted client connection.

        With ``--cert``, the first byte (peeked, within the handshake budget) tells a
        TLS client from a plain one; None means the connection was answered and closed
        here (a plain client where TLS is required, nothing sent in time). TLS
        handshake failures raise :class:`TlsFailure`.
        """
        if self.tls is None:
            return SocketTransport(sock)
        speaks_tls = await sniff_tls(sock)
        if speaks_tls:
            return StreamTransport(await self.tls.handshake(sock))
        if speaks_tls is None:
            self.metrics.handshake_failed(HandshakeFailure.CLIENT_GONE)
            log.info("client %s: closed the connection before sending anything", peer)
            return None
        if not self.tls.requires_tls:
            return SocketTransport(sock)
        self.metrics.handshake_failed(HandshakeFailure.PLAIN_ON_SSL_ONLY)
        if self.tls.ssl_only:
            log.warning("client %s: refused with 400: plain connection on --ssl-only", peer)
            reason = "This port accepts only TLS: use wss:// (or https://)."
        else:
            log.warning(
                "client %s: refused with 400: plain connection where a client certificate "
                "is required (--verify-client)",
                peer,
            )
            reason = "This port requires TLS with a client certificate: use wss:// (or https://)."
        await self._refuse(sock, HttpRefusal(400, reason), plain=True)
        return None

    async def _refuse(
        self, sock: socket.socket, refusal: HttpRefusal, *, plain: bool = False
    ) -> None:
        """Answer a connection refused before its request, in plain HTTP, and close it.

        A refusal must cost next to nothing, or refusing becomes the attack: the answer
        is one non-blocking send, and the socket lingers (so the answer is not lost to
        a reset by unread input) only briefly and only while few others do; beyond
        that it is closed at once. A TLS client cannot read plain HTTP, and a TLS
        handshake is exactly the work a refusal must not cost, so with ``--cert`` a
        connection that has not sent plain HTTP yet is closed without an answer. The
        caller logs why.
        """
        try:
            if self.tls is not None and not plain and sniff_tls_now(sock) is not False:
                return
            response = plain_response(http.HTTPStatus(refusal.status), f"{refusal.reason}\n")
            for name, value in refusal.headers:
                response.headers[name] = value
            try:
                sock.send(response.serialize())
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
            if self._lingering >= MAX_LINGERING_REFUSALS:
                return
            self._lingering += 1
            try:
                with trio.move_on_after(REFUSAL_LINGER):
                    await drain_until_eof(sock)
            finally:
                self._lingering -= 1
        finally:
            close_socket(sock)

    async def _serve_connection(
        self, channel: ClientChannel, handshake: Handshake, client: Client, admissions: ExitStack
    ) -> None:
        """The request, then one answer: a refusal, an HTTP response, or a session."""
        request = await receive_request(channel)
        self._handshakes.leave(handshake)
        if isinstance(request, Refusal):
            self.metrics.handshake_failed(request.kind)
            key = f"{request.kind} {request.status}"
            self._handshake_log.log(key, "client %s: %s", channel.peer, request.reason)
            await channel.linger_and_close(self.config.limits.close_timeout)
            return
        if client.address in self.trusted_proxies:
            refusal = await self._forwarded_for(request, client, admissions)
            channel.peer = client.name
            if refusal is not None:  # over the named client's limits
                await self._answer_http(channel, request, _reject(channel.protocol, refusal))
                return
        if self.http is not None and not is_websocket_upgrade(request):
            answer = await self.http.respond(request, channel.peer)
            if answer is not None:
                await self._answer_http(channel, request, answer)
                return
        response, address = await self._decide(channel, request, client)
        if address is None:
            self.metrics.handshake_failed(response.status_code)
            await self._answer_http(channel, request, response)
            return
        await self._relay(channel, request, response, address)

    async def _forwarded_for(
        self, request: Request, client: Client, admissions: ExitStack
    ) -> HttpRefusal | None:
        """Take the client a trusted proxy names in its forwarding header, and admit it.

        A header that cannot be read where the chain is walked is ignored (the proxy
        stays the client, and is not limited) with one rate-limited line: it is the
        proxy's to write, so it is a configuration problem, not the client's fault.
        """
        header = self.config.forwarded_header
        try:
            named = forwarded_client(request.headers, header, self.trusted_proxies)
        except ForwardedError as exc:
            self._proxy_log.log(
                f"an unreadable {FORWARDED_HEADERS[header]}",
                "client %s: %s ignored: %s",
                client.name,
                FORWARDED_HEADERS[header],
                exc,
            )
            return None
        if named is None:
            return None
        client.proxied_by(*named)
        return await self._admit(client, admissions)

    async def _decide(
        self, channel: ClientChannel, request: Request, client: Client
    ) -> tuple[Response, Address | None]:
        """The handshake's answer and, when it is 101, where to relay: websockets'
        checks, then the gates, then the resolver."""
        protocol = channel.protocol
        response = decide_response(protocol, request)
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            return response, None
        try:
            info = dataclasses.replace(client_info(channel.transport, channel.peer), via=client.via)
            for gate in self.gates:
                await gate.check(request, info)
            return response, await self.resolver.resolve(request, channel.peer)
        except HttpRefusal as refusal:
            response = _reject(protocol, refusal)
        except Exception:
            # A gate or resolver (possibly an operator's plugin) failed: this client
            # gets a 500, every other connection carries on.
            log.exception("client %s: checking the request failed", channel.peer)
            response = protocol.reject(500, "Internal error while checking the request\n")
        return response, None

    async def _relay(
        self, channel: ClientChannel, request: Request, response: Response, address: Address
    ) -> None:
        """Connect to the target, accept the WebSocket, and run the session to its end."""
        protocol = channel.protocol
        limits = self.config.limits
        stats = SessionStats(new_session_id(), channel.peer, str(address))
        try:
            target = await connect(address, limits.connect_timeout, tls=self.target_tls)
        except TargetUnavailable as exc:
            self.metrics.handshake_failed(HandshakeFailure.TARGET_UNAVAILABLE)
            # Accept first so that a browser can show the reason: it never sees HTTP errors.
            protocol.send_response(response)
            protocol.send_close(INTERNAL_ERROR, fit_reason(str(exc)))
            await channel.flush()
            self._target_log.log(
                stats.target, "session %s: client %s: %s", stats.session_id, channel.peer, exc
            )
            await channel.linger_and_close(limits.close_timeout)
            return
        try:
            protocol.send_response(response)
            await channel.flush()
        except BaseException:
            with trio.CancelScope(shield=True):
                await target.aclose()
            raise
        path = self.redact_path(request.path)
        log.debug(
            "session %s opened: client=%s path=%s target=%s subprotocol=%s",
            stats.session_id,
            channel.peer,
            path,
            address,
            protocol.subprotocol,
        )
        observer = self._open_observer(stats, path, protocol.subprotocol)
        session = Session(channel, target, self.config, stats, observer, self._heartbeats)
        self.sessions.add(session)
        self.metrics.session_opened(stats)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.session_closed(stats)
            log.info("%s", stats.summary(), extra=stats.journal_fields())

    def _open_observer(
        self, stats: SessionStats, path: str, subprotocol: str | None
    ) -> SessionObserver | None:
        """The session's recorder, if any; one that fails to start costs the recording only."""
        if self.observers is None:
            return None
        info = SessionInfo(
            session_id=stats.session_id,
            client=stats.client,
            target=stats.target,
            path=path,
            subprotocol=subprotocol,
            started_wall=time.time(),
        )
        try:
            return self.observers.open(info)
        except Exception:
            log.exception(
                "session %s: the recording could not start; the session is relayed unrecorded",
                stats.session_id,
            )
            return None

    async def _answer_http(
        self, channel: ClientChannel, request: Request, response: Response
    ) -> None:
        """Send a non-101 response, log it, and close the connection.

        A file (:class:`~trio_bridge.web.FileResponse`) follows its headers from the open
        file in bounded pieces and is closed whatever happens; a client that goes away or
        takes nothing for ``handshake_timeout`` meanwhile is logged and closed at once
        (there is nothing left to linger for). What the client wrote is escaped in the log.
        """
        limits = self.config.limits
        status = response.status_code
        cause = response.cause if isinstance(response, HeadResponse) else refusal_reason(response)
        outcome = f": {escape(cause)}" if status >= 400 else ""
        cut_short = None
        if isinstance(response, FileResponse):
            async with channel.write_turn:
                with response.file as body:
                    await channel.send_raw(response.serialize(), more=body.size > 0)
                    cut_short = await send_file(channel.transport, body, limits.handshake_timeout)
            if cut_short is not None:
                outcome = f", cut short after {body.sent} of {body.size} bytes: {cut_short}"
        else:
            if request.method == "HEAD" and response.body:
                # No content in an answer to HEAD (RFC 9110 9.3.2), whoever built it.
                response = Response(status, response.reason_phrase, response.headers)
            channel.protocol.send_response(response)
            await channel.flush()
        log.log(
            logging.INFO if status < 400 and cut_short is None else logging.WARNING,
            "client %s: %s %s -> %d%s",
            channel.peer,
            escape(request.method),
            escape(self.redact_path(request.path)),
            status,
            outcome,
        )
        if cut_short is not None:
            await channel.transport.aclose()
            return
        await channel.linger_and_close(limits.close_timeout)


def _reject(protocol: ServerProtocol, refusal: HttpRefusal) -> Response:
    """The HTTP answer to a parsed request that is refused."""
    response = protocol.reject(refusal.status, f"{refusal.reason}\n")
    for name, value in refusal.headers:
        response.headers[name] = value
    return response


async def serve(
    config: Config,
    listeners: Sequence[socket.socket] | None = None,
    *,
    task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`Bridge` for ``config``; ``await nursery.start(serve, config)`` gives it."""
    await Bridge(config).serve(listeners, task_status=task_status)
