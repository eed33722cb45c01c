"""Running one configured bridge as a process: signals, systemd, recorder, add-ons.

:mod:`trio_bridge.cli` turns a command line into a
:class:`~trio_bridge.config.ServiceConfig` and :class:`~trio_bridge.addons.Addons` builds
its parts; this module runs them. SIGTERM/SIGINT drain and stop, SIGHUP reloads what can be
reloaded, and systemd hears about each step (READY, STATUS, RELOADING, STOPPING,
WATCHDOG) through :mod:`trio_bridge.systemd`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import trio

from .activation import InheritedSockets, Role
from .addons import Addons
from .recording import running_recorder
from .server import GOING_AWAY, Bridge
from .systemd import ServiceLink, service_link

log = logging.getLogger("trio_bridge")


async def run(addons: Addons, inherited: InheritedSockets | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return; SIGHUP reloads.

    A second SIGTERM/SIGINT ends the drain at once (sessions are closed with 1001), a
    third stops without waiting for clients to answer the close; signals keep being
    handled until the very end (the recorder writing its last files included), so none
    is left pending, to be acted on by Python's default handler (a KeyboardInterrupt
    traceback) once the bridge has finished.

    With ``inherited`` sockets (systemd, inetd) nothing is bound: the bridge serves
    those listeners, or the one inherited connection and then returns. systemd is
    kept informed (READY, STATUS, STOPPING, WATCHDOG) by :mod:`trio_bridge.systemd`.
    """
    bridge = addons.bridge
    if inherited is not None:
        log.info("serving %s; no address is bound", inherited)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with service_link(bridge, bridge.reload_hooks()) as link:
            stops = _StopRequests(bridge, link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stops.handle, signals)
                with stops.scope:
                    async with running_recorder(addons.recorder):
                        await _serve(addons, bridge, inherited, stops)
                nursery.cancel_scope.cancel()


class _StopRequests:
    """What SIGTERM/SIGINT (and SIGHUP) mean at each stage of the bridge's life.

    While starting (which can wait 30 s for a wrapped program to listen), a stop
    request cancels the start. Once serving, the first drains for ``--shutdown-grace``,
    the second ends the drain (1001 to every session, then up to ``--close-timeout``
    for the clients to answer), the third cancels what is left. With one inherited
    connection (inetd), the first closes it with 1001 and the second cancels.
    """

    def __init__(self, bridge: Bridge, link: ServiceLink) -> None:
        self.bridge = bridge
        self.link = link
        self.scope = trio.CancelScope()  # starting, serving, and writing the last recordings
        self.connection_scope = trio.CancelScope()  # the one inherited connection
        self.serving = False
        self.one_connection = False
        self.count = 0

    async def handle(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self.serving:  # nothing to reload yet while starting
                    await self.link.reload()
                continue
            self.count += 1
            self._stop(signal.Signals(signum).name)

    def _stop(self, name: str) -> None:
        if self.count == 1:
            self.link.stopping()
        if not self.serving:
            log.info("received %s while starting", name)
            self.scope.cancel()
        elif self.count == 1 and self.one_connection:
            log.info("received %s: closing the connection (send it again to stop now)", name)
            self._close_sessions()
        elif self.count == 1:
            grace = self.bridge.config.limits.shutdown_grace
            log.info(
                "received %s: draining up to %g s (send it again to close every session now)",
                name,
                grace,
            )
            self.bridge.request_shutdown()
        elif self.count == 2 and not self.one_connection:
            log.info("received %s again: closing every session now", name)
            self.bridge.request_shutdown(now=True)
        else:
            log.info("received %s again: stopping without waiting for clients", name)
            self.scope.cancel()

    def _close_sessions(self) -> None:
        """1001 to the one session; cancelled if the client does not answer in time."""
        for session in list(self.bridge.sessions):
            session.request_close(GOING_AWAY, "server shutting down")
        limits = self.bridge.config.limits
        self.connection_scope.deadline = trio.current_time() + limits.close_timeout + 1


async def _serve(
    addons: Addons, bridge: Bridge, inherited: InheritedSockets | None, stops: _StopRequests
) -> None:
    """Start serving, tell systemd it is ready, and serve until a stop request ends it."""
    if inherited is not None and inherited.connection is not None:
        stops.serving = stops.one_connection = True
        stops.link.ready()
        with stops.connection_scope:
            await bridge.serve_connection(inherited.connection)
        return
    listeners = None
    if inherited is not None:
        # wss sockets take the same path: with --cert, each connection's first
        # byte tells TLS from plain (--ssl-only refuses plain ones).
        listeners = inherited.listening(Role.WS) + inherited.listening(Role.WSS)
    async with trio.open_nursery() as nursery:
        await nursery.start(addons.serve, listeners)
        stops.serving = True
        stops.link.ready()
