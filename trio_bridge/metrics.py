"""Prometheus metrics: what the bridge counts, exposed with ``prometheus_client``.

The bridge's families come from one collector, :class:`BridgeMetrics`, read when
Prometheus scrapes. It lives in a :class:`~prometheus_client.CollectorRegistry` of its
own, never the library's process-global one, so two bridges in one process (the tests,
an embedding program) each show their own figures. ``generate_latest`` writes the text
format; :class:`MetricsServer` serves it with Trio, not with the library's threaded
HTTP server.

Hot paths pay nothing: byte counts are read from the live sessions' own statistics when
Prometheus scrapes, and the plain integers here move only when a session opens or ends,
a handshake fails or the recorder drops data. The families are built afresh at each
scrape (no ``prometheus_client.Counter`` objects), so they carry no ``_created`` samples:
the exposition is exactly what docs/metrics.md documents.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING

import trio
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from .handshake import WEBSOCKETS_LOG, HandshakeFailure
from .listeners import accept_forever, describe
from .logs import RateLimitedLog
from .netio import close_socket
from .request_target import split_target
from .version import __version__
from .web import SAFE_METHODS, http_response, method_not_allowed, text_response

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, Metric

    from .session import SessionStats

log = logging.getLogger("trio_bridge.metrics")

#: What ``generate_latest`` writes: the text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def close_code_label(code: int | None) -> str:
    """Close codes as a bounded label: clients choose 3000-4999 freely, so those are bucketed."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def labelled(family: CounterMetricFamily, samples: Iterable[tuple[Sequence[str], int]]) -> Metric:
    """``family`` with its samples: (label values, value) pairs."""
    for labels, value in samples:
        family.add_metric(labels, value)
    return family


class BridgeMetrics:
    """What :class:`~trio_bridge.server.Bridge` counts: a prometheus_client collector.

    The bridge calls :meth:`session_opened` / :meth:`session_closed` /
    :meth:`handshake_failed`, the recorder :meth:`recording_gap`; the registry calls
    :meth:`collect` at each scrape.
    """

    def __init__(self, *, process: bool = True) -> None:
        self._process = process
        self.sessions = 0
        self._open: dict[int, SessionStats] = {}
        self._closed_up = 0
        self._closed_down = 0
        # Every fixed reason is exported from the start, so rate() works at once.
        self.handshake_failures = Counter({reason.value: 0 for reason in HandshakeFailure})
        self.closes: Counter[tuple[str, str]] = Counter()
        self.recording_gaps = 0
        self.recording_lost_bytes = 0

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """The registry the endpoint serves: this collector, the official ``process_*``
        families (unless ``process=False``) and what other components register.

        Made when first asked for, as prometheus_client is imported then: that import
        costs ~15 ms of start-up, which a bridge serving no metrics need not pay.
        """
        from prometheus_client import CollectorRegistry, ProcessCollector

        # auto_describe: a family registered twice (here or by another component) is
        # refused when registered, not found as a duplicate in a scrape.
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        if self._process:
            ProcessCollector(registry=registry)
        return registry

    # -- called by the server and the recorder ----------------------------------------

    def session_opened(self, stats: SessionStats) -> None:
        self._open[id(stats)] = stats
        self.sessions += 1

    def session_closed(self, stats: SessionStats) -> None:
        if self._open.pop(id(stats), None) is None:
            return
        self._closed_up += stats.bytes_up
        self._closed_down += stats.bytes_down
        self.closes[close_code_label(stats.close_code), stats.closed_by or "none"] += 1

    def handshake_failed(self, reason: HandshakeFailure | int) -> None:
        """A connection ended before its session opened: a fixed reason, or the HTTP
        status its request was refused with (counted as ``http_<status>``)."""
        label = f"http_{reason}" if isinstance(reason, int) else reason.value
        self.handshake_failures[label] += 1

    def recording_gap(self, frames: int, lost_bytes: int) -> None:
        """The recorder's ``on_gap``: it wrote a GAP record for ``frames`` dropped frames."""
        self.recording_gaps += 1
        self.recording_lost_bytes += lost_bytes

    # -- read at scrape time ----------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The families as they are now; the registry calls this at each scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = GaugeMetricFamily(
            "trio_bridge_build_info", "The trio-bridge version, as a label.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "trio_bridge_sessions_open", "WebSocket sessions relaying now.", value=len(self._open)
        )
        yield CounterMetricFamily(
            "trio_bridge_sessions_total",
            "WebSocket sessions opened (handshake done, target connected).",
            value=self.sessions,
        )
        live = self._open.values()
        up = self._closed_up + sum(stats.bytes_up for stats in live)
        down = self._closed_down + sum(stats.bytes_down for stats in live)
        yield labelled(
            CounterMetricFamily(
                "trio_bridge_bytes_total",
                "Payload bytes relayed, by direction (live sessions included).",
                labels=["direction"],
            ),
            [(("client_to_target",), up), (("target_to_client",), down)],
        )
        yield labelled(
            CounterMetricFamily(
                "trio_bridge_handshake_failures_total",
                "Connections that ended before a session opened, by reason.",
                labels=["reason"],
            ),
            [((reason,), count) for reason, count in self.handshake_failures.items()],
        )
        yield labelled(
            CounterMetricFamily(
                "trio_bridge_sessions_closed_total",
                "Sessions ended, by WebSocket close code (3xxx/4xxx bucketed) and who closed.",
                labels=["code", "closed_by"],
            ),
            self.closes.items(),
        )
        yield CounterMetricFamily(
            "trio_bridge_recording_gaps_total",
            "Gaps in session recordings: times the recorder had to drop frames.",
            value=self.recording_gaps,
        )
        yield CounterMetricFamily(
            "trio_bridge_recording_lost_bytes_total",
            "Payload bytes relayed but dropped from session recordings (at their gaps).",
            value=self.recording_lost_bytes,
        )


# -- the /metrics endpoint --------------------------------------------------------------

REQUEST_TIMEOUT = 10.0
MAX_CONCURRENT_SCRAPES = 16


class MetricsServer:
    """Serves ``GET /metrics`` on its own listening socket (``--metrics``).

    A separate port, not a path on the WebSocket port: metrics stay private to
    whoever can reach that address, whatever the public port serves.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_scrape``: fetch what the registry's collectors read (the main
        process of ``--workers`` asks every worker)."""
        self.registry = registry
        self.before_scrape = before_scrape
        self._slots = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)
        self.address = ""

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[MetricsServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener.setblocking(False)
        self.address = describe(listener)
        log.info("metrics on http://%s/metrics", self.address)
        exhausted = RateLimitedLog(
            log, lambda key, n, s: f"metrics: {n} more accept failures in the last {s:g} s"
        )

        def out_of_resources(exc: OSError) -> None:
            exhausted.log("accept", "metrics: cannot accept scrapes: %s; retrying", exc.strerror)

        try:
            async with trio.open_nursery() as nursery:

                def handle(sock: socket.socket) -> None:
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    nursery.start_soon(self._handle, stream)

                task_status.started(self)
                await accept_forever(listener, handle, out_of_resources)
        finally:
            close_socket(listener)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    request = await read_request(stream)
                    if request is not None and self.before_scrape is not None:
                        await self.before_scrape()
                    if request is not None:
                        await stream.send_all(self._answer(request).serialize())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                # One scrape's failure (a collector's bug) ends that scrape, not the process.
                log.exception("metrics: answering a scrape failed; the connection is closed")
            finally:
                self._slots.release()

    def _answer(self, request: Request) -> Response:
        from prometheus_client import generate_latest  # loaded with the registry already

        head = request.method == "HEAD"
        if split_target(request.path)[0] != "/metrics":
            return text_response(
                HTTPStatus.NOT_FOUND, "not found: metrics are at /metrics", head=head
            )
        if request.method not in SAFE_METHODS:
            return method_not_allowed(request.method)
        return http_response(
            HTTPStatus.OK,
            generate_latest(self.registry),
            content_type=CONTENT_TYPE,
            headers=[("Cache-Control", "no-store")],
            head=head,
        )


async def read_request(stream: trio.abc.ReceiveStream) -> Request | None:
    """One HTTP request head, parsed by websockets' sans-I/O ``ServerProtocol`` as on the
    WebSocket port (its line and header limits apply); None when the client sends
    something else or goes away, and the caller closes the connection."""
    protocol = ServerProtocol(logger=WEBSOCKETS_LOG)
    while protocol.handshake_exc is None:
        data = await stream.receive_some(4096)
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()  # sets handshake_exc: the request is incomplete
        for event in protocol.events_received():
            if isinstance(event, Request):
                return event
    return None
