"""What a command line adds around a :class:`~trio_bridge.server.Bridge`, built from its Config.

- plain HTTP on the WebSocket port: the health endpoint and, with ``--web``, files;
- who answers WebSocket requests instead of ``config.target``: nobody with
  ``--file-only``, the wrapped program in wrap mode;
- metrics: always counted, served on ``--metrics`` (or a systemd socket named
  ``metrics``);
- lifetimes: the wrapped program starts before the bridge serves and stops after it
  has drained; in ``exit`` mode the program's end stops the bridge, and the process
  exits with the program's status (:class:`WrappedProgramExited`).

The CLI does ``addons = Addons(config)``, ``bridge = addons.bridge()`` and
``await nursery.start(addons.serve, bridge, listeners)`` where it would call
``bridge.serve``. Embedding programs can do the same, or use the parts directly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import trio

from .auth import OriginAllowlist
from .config import Config, StartupError
from .listeners import bind
from .metrics import BridgeMetrics, MetricsServer
from .routing import HttpResponder, RequestGate, TargetResolver
from .server import Bridge
from .web import FileServer, FirstAnswer, HealthEndpoint, NoRelay
from .wrap import Supervisor, first_leaf

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class WrappedProgramExited(Exception):
    """In ``exit`` mode the program ended and the bridge with it; ``status`` is the
    exit status for the process (the program's, or 128 + signal)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the wrapped program ended (exit status {status})")
        self.status = status

    @classmethod
    def status_of(cls, group: BaseExceptionGroup[WrappedProgramExited]) -> int:
        """The status inside the exception group a nursery wraps this in."""
        return first_leaf(group).status


class WrappedProgramMetrics:
    """A prometheus_client collector: the wrapped program's state, read from its
    supervisor when Prometheus scrapes (nothing to update as the program comes and goes)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        # Imported here, as in BridgeMetrics.registry: no start-up cost where unused.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "trio_bridge_wrapped_program_up",
            "1 while the wrapped program is running and reachable.",
            value=float(self.supervisor.running),
        )
        yield CounterMetricFamily(
            "trio_bridge_wrapped_program_starts_total",
            "Times the wrapped program was started.",
            value=self.supervisor.starts,
        )


def web_gates(gates: Sequence[RequestGate]) -> list[RequestGate]:
    """The bridge's own gate objects (so SIGHUP reloads reach them) minus Origin checks:
    a browser sends no Origin header when it loads a page, so they would refuse vnc.html.
    """
    chosen = [gate for gate in gates if not isinstance(gate, OriginAllowlist)]
    if not chosen:
        raise StartupError(
            "--web-auth: no --auth-plugin to apply to files (Origin checks do not apply: "
            "browsers send no Origin header when they load a page)"
        )
    return chosen


class Addons:
    """The parts ``config`` asks for, built once, handed to one :class:`Bridge`."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: BridgeMetrics | None = None,
        metrics_listeners: Sequence[socket.socket] = (),
    ) -> None:
        """``metrics_listeners`` replace binding ``config.metrics_listen`` (systemd's
        ``metrics`` sockets)."""
        self.config = config
        self.metrics = metrics or BridgeMetrics()
        self.metrics_listeners = list(metrics_listeners)
        self.supervisor: Supervisor | None = None
        self.resolver: TargetResolver | None = None
        if config.wrap is not None:
            supervisor = Supervisor(config.wrap, connect_timeout=config.limits.connect_timeout)
            self.supervisor = self.resolver = supervisor
            self.metrics.registry.register(WrappedProgramMetrics(supervisor))
        elif config.file_only:
            self.resolver = NoRelay()
        responders: list[HttpResponder] = []
        if config.health_path is not None:
            health = HealthEndpoint(config.health_path)
            if self.supervisor is not None:
                health.add_check(self.supervisor.health)
            responders.append(health)
        self.files: FileServer | None = None
        if config.web is not None:
            self.files = FileServer(config.web, listing=config.web_listing)
            responders.append(self.files)
        self.http: HttpResponder | None = FirstAnswer(*responders) if responders else None
        self._exit_status: int | None = None

    def bridge(self) -> Bridge:
        bridge = Bridge(self.config, http=self.http, resolver=self.resolver, metrics=self.metrics)
        if self.files is not None and self.config.web_auth:
            self.files.gates = web_gates(bridge.gates)
        return bridge

    async def serve(
        self,
        bridge: Bridge,
        listeners: Sequence[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``bridge.serve`` with the wrapped program and the metrics endpoint around it."""
        metrics_listeners = self.metrics_listeners
        if not metrics_listeners and self.config.metrics_listen is not None:
            metrics_listeners = [bind(self.config.metrics_listen)]
        async with trio.open_nursery() as nursery:
            for listener in metrics_listeners:
                await nursery.start(MetricsServer(self.metrics.registry).serve, listener)
            if self.supervisor is not None:

                def program_ended(status: int) -> None:
                    self._exit_status = status
                    bridge.request_shutdown()

                self.supervisor.on_exit = program_ended
                await nursery.start(self.supervisor.run)
            await bridge.serve(listeners, task_status=task_status)
            nursery.cancel_scope.cancel()  # stops the program (shielded) and the metrics
        if self._exit_status is not None:
            raise WrappedProgramExited(self._exit_status)
