"""Running one configured bridge as a process: signals, systemd, recorder, add-ons.

:mod:`trio_bridge.cli` turns a command line into a :class:`~trio_bridge.config.Config`;
this module runs it. SIGTERM/SIGINT drain and stop, SIGHUP reloads what can be
reloaded, and systemd hears about each step (READY, STATUS, RELOADING, STOPPING,
WATCHDOG) through :mod:`trio_bridge.systemd`.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import trio

from .activation import InheritedSockets, Role
from .addons import Addons
from .config import Config
from .recording import recorder_for, running_recorder
from .server import GOING_AWAY, Bridge
from .systemd import ServiceLink, service_link

log = logging.getLogger("trio_bridge")


async def run(config: Config, inherited: InheritedSockets | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return; SIGHUP reloads.

    With ``inherited`` sockets (systemd, inetd) nothing is bound: the bridge serves
    those listeners, or the one inherited connection and then returns. systemd is
    kept informed (READY, STATUS, STOPPING, WATCHDOG) by :mod:`trio_bridge.systemd`.
    """
    addons = Addons(
        config,
        metrics_listeners=inherited.listening(Role.METRICS) if inherited is not None else (),
    )
    bridge = addons.bridge()
    recorder = recorder_for(config)
    if recorder is not None:
        bridge.observers = recorder  # the recorder watches the sessions of Addons' bridge
    if inherited is not None:
        log.info("serving %s; no address is bound", inherited)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with service_link(bridge, bridge.reload_hooks()) as link, running_recorder(recorder):
            if inherited is not None and inherited.connection is not None:
                await _serve_one(bridge, inherited.connection, link, signals)
                return
            async with trio.open_nursery() as nursery:
                listeners = None
                if inherited is not None:
                    # wss sockets take the same path: with --cert, each connection's first
                    # byte tells TLS from plain (--ssl-only refuses plain ones).
                    listeners = inherited.listening(Role.WS) + inherited.listening(Role.WSS)
                start = (addons.serve, bridge, listeners)
                if not await _start_unless_stopped(signals, nursery, *start):
                    nursery.cancel_scope.cancel()  # it may have started in the same instant
                    return
                link.ready()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await link.reload()
                        continue
                    log.info("received %s", signal.Signals(signum).name)
                    link.stopping()
                    bridge.request_shutdown()
                    break


async def _start_unless_stopped(
    signals: AsyncIterator[int], nursery: trio.Nursery, *start: Any
) -> bool:
    """``nursery.start(*start)``, given up (False) on SIGTERM/SIGINT: starting waits up to
    30 s for a wrapped program to listen, and a stop request must not wait that long."""
    stopped = False
    async with trio.open_nursery() as race:

        async def watch() -> None:
            nonlocal stopped
            async for signum in signals:
                if signum != signal.SIGHUP:  # nothing to reload yet
                    log.info("received %s while starting", signal.Signals(signum).name)
                    stopped = True
                    race.cancel_scope.cancel()

        race.start_soon(watch)
        await nursery.start(*start)
        race.cancel_scope.cancel()
    return not stopped


async def _serve_one(
    bridge: Bridge, sock: socket.socket, link: ServiceLink, signals: AsyncIterator[int]
) -> None:
    """Accept=yes / inetd: relay the one connection; SIGTERM closes it with 1001."""
    async with trio.open_nursery() as nursery:

        async def close_on_signal() -> None:
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
            link.stopping()
            for session in list(bridge.sessions):
                session.request_close(GOING_AWAY, "server shutting down")
            await trio.sleep(bridge.config.limits.close_timeout + 1)
            nursery.cancel_scope.cancel()

        nursery.start_soon(close_on_signal)
        link.ready()
        await bridge.serve_connection(sock)
        nursery.cancel_scope.cancel()
