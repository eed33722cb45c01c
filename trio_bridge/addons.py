"""The parts a command line runs around a :class:`~trio_bridge.server.Bridge`, built once.

- plain HTTP on the WebSocket port: the health endpoint and, with ``--web``, files;
- who answers WebSocket requests instead of ``config.target``: nobody with
  ``--file-only``, the wrapped program in wrap mode;
- metrics: always counted, served on ``--metrics`` (or a systemd socket named
  ``metrics``);
- lifetimes: the wrapped program starts before the bridge serves and stops after it
  has drained; in ``exit`` mode the program's end stops the bridge, and the process
  exits with the program's status (:class:`WrappedProgramExited`).

The CLI does ``addons = Addons(service)`` and ``await nursery.start(addons.serve,
listeners)`` where it would call ``bridge.serve``; ``addons.bridge`` is the bridge.
Embedding programs can do the same, or use the parts directly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import trio

from .auth import OriginAllowlist, gates_for
from .config import ServiceConfig
from .limits import AddressLimiter
from .listeners import bind
from .metrics import BridgeMetrics, MetricsServer
from .recording import recorder_for
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


class Addons:
    """The one composition step: every part ``service`` asks for, built once.

    Files are read and plugins made here, each once (a bad certificate or an unknown
    plugin fails before anything serves), and each part gets what it uses when it is
    made: the :class:`Bridge` its resolver, gates, HTTP responders and recorder; the
    file server the bridge's own gate objects (so SIGHUP reloads reach both).
    """

    def __init__(
        self,
        service: ServiceConfig,
        *,
        metrics: BridgeMetrics | None = None,
        metrics_listeners: Sequence[socket.socket] = (),
        address_limits: AddressLimiter | None = None,
    ) -> None:
        """``metrics_listeners`` replace binding ``service.metrics_listen`` (systemd's
        ``metrics`` sockets)."""
        config = service.bridge
        self.service = service
        self.metrics = metrics or BridgeMetrics()
        self.metrics_listeners = list(metrics_listeners)
        self.supervisor: Supervisor | None = None
        resolver: TargetResolver | None = None
        if service.wrap is not None:
            supervisor = Supervisor(
                service.wrap,
                on_exit=self._program_ended,
                connect_timeout=config.limits.connect_timeout,
            )
            self.supervisor = resolver = supervisor
            self.metrics.registry.register(WrappedProgramMetrics(supervisor))
        elif service.file_only:
            resolver = NoRelay()
        gates = gates_for(config)
        self.recorder = recorder_for(service, on_gap=self.metrics.recording_gap)
        self.bridge = Bridge(
            config,
            resolver=resolver,
            gates=gates,
            http=self._http(gates),
            observers=self.recorder,
            metrics=self.metrics,
            address_limits=address_limits,
        )
        self._exit_status: int | None = None

    def _http(self, gates: Sequence[RequestGate]) -> HttpResponder | None:
        """The health endpoint and files, on the WebSocket port."""
        service = self.service
        responders: list[HttpResponder] = []
        if service.health_path is not None:
            health = HealthEndpoint(service.health_path)
            if self.supervisor is not None:
                health.add_check(self.supervisor.health)
            responders.append(health)
        if service.web is not None:
            # Not the Origin checks: a browser sends no Origin header when it loads a page.
            file_gates = [g for g in gates if not isinstance(g, OriginAllowlist)]
            files = FileServer(
                service.web,
                listing=service.web_listing,
                gates=file_gates if service.web_auth else (),
            )
            responders.append(files)
        return FirstAnswer(*responders) if responders else None

    def _program_ended(self, status: int) -> None:
        """In ``exit`` mode: the bridge drains and stops, and the process exits with
        the program's status."""
        self._exit_status = status
        self.bridge.request_shutdown()

    async def serve(
        self,
        listeners: Sequence[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``bridge.serve`` with the wrapped program and the metrics endpoint around it."""
        bridge = self.bridge
        metrics_listeners = self.metrics_listeners
        if not metrics_listeners and self.service.metrics_listen is not None:
            metrics_listeners = [bind(self.service.metrics_listen)]
        async with trio.open_nursery() as nursery:
            for listener in metrics_listeners:
                await nursery.start(MetricsServer(self.metrics.registry).serve, listener)
            if self.supervisor is not None:
                await nursery.start(self.supervisor.run)
            await bridge.serve(listeners, task_status=task_status)
            nursery.cancel_scope.cancel()  # stops the program (shielded) and the metrics
        if self._exit_status is not None:
            raise WrappedProgramExited(self._exit_status)
