"""Prometheus metrics: a few counters, gauges read at scrape time, and the text format.

Written by hand rather than with ``prometheus_client``: the bridge exposes about ten
families with small, fixed label sets, and the text exposition format (version 0.0.4)
is a few lines of escaping. The library would bring a process-global default registry
(two bridges in one process, as in the tests, would collide), a threaded HTTP server
that does not fit Trio, and multiprocess machinery the bridge has no use for. The test
suite checks this output with ``prometheus_client``'s own parser instead.

Hot paths pay nothing: byte counts are read from the live sessions' own statistics
when Prometheus scrapes, and counters move only when a session opens or ends or a
handshake fails.

Other components register their own families on :attr:`BridgeMetrics.registry`, or
increment the counters exposed here, e.g. the recorder:
``bridge.metrics.recording_gaps.inc()``.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING

import trio
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from .logs import RateLimitedLog
from .netio import close_socket
from .web import SAFE_METHODS, http_response, method_not_allowed, split_target, text_response

if TYPE_CHECKING:
    from .handshake import Refusal
    from .session import SessionStats

log = logging.getLogger("trio_bridge.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]


def _version() -> str:
    from . import __version__  # the package imports this module while it initialises

    return __version__


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Family(ABC):
    """One metric family: a name, a help line, a type and its samples at scrape time."""

    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind

    @abstractmethod
    def samples(self) -> Iterable[Sample]: ...

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples():
            text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels)
            series = f"{self.name}{{{text}}}" if text else self.name
            lines.append(f"{series} {_number(value)}")
        return "\n".join(lines) + "\n"


class Counter(Family):
    """A monotonic count, optionally split by labels: ``inc()`` or ``inc(reason="x")``."""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help, "counter")
        self.labelnames = labelnames
        self._values: dict[Labels, float] = {} if labelnames else {(): 0}

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        key = tuple((name, labels[name]) for name in self.labelnames)
        self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple((name, labels[name]) for name in self.labelnames), 0)

    def samples(self) -> Iterable[Sample]:
        return sorted(self._values.items())


class Observed(Family):
    """A family whose samples a function computes at scrape time (live values)."""

    def __init__(
        self, name: str, help: str, kind: str, read: Callable[[], Mapping[Labels, float]]
    ) -> None:
        super().__init__(name, help, kind)
        self._read = read

    def samples(self) -> Iterable[Sample]:
        return sorted(self._read().items())


class Registry:
    """The families one ``/metrics`` page shows, in registration order."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def add(self, family: Family) -> Family:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} is already registered")
        self.families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        counter = Counter(name, help, labelnames)
        self.add(counter)
        return counter

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A value read at scrape time."""
        self.add(Observed(name, help, "gauge", lambda: {(): read()}))

    def observed_counter(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A count kept elsewhere (it must never go down), read at scrape time."""
        self.add(Observed(name, help, "counter", lambda: {(): read()}))

    def render(self) -> str:
        return "".join(family.render() for family in self.families.values())


# -- the process ------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_fields(path: str) -> list[str]:
    try:
        with open(path) as file:
            return file.read().split()
    except OSError:
        return []


def _start_time() -> float:
    """The process's start in Unix time, from /proc (as prometheus_client computes it)."""
    try:
        with open("/proc/self/stat") as file:
            # Field 22, starttime in clock ticks since boot; fields count from 1 and the
            # command name (field 2, in parentheses) may contain spaces.
            after_name = file.read().rpartition(")")[2].split()
        boot = _proc_fields("/proc/stat")
        btime = float(boot[boot.index("btime") + 1])
        return btime + float(after_name[22 - 3]) / _TICKS
    except (OSError, ValueError, IndexError):
        return time.time()


def register_process_metrics(registry: Registry) -> None:
    """The standard ``process_*`` families, read from /proc at scrape time."""

    def statm(index: int) -> float:
        fields = _proc_fields("/proc/self/statm")
        return float(fields[index]) * _PAGE if fields else 0.0

    def open_fds() -> float:
        try:
            return float(len(os.listdir("/proc/self/fd")))
        except OSError:
            return 0.0

    def cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system

    start = _start_time()
    registry.gauge(
        "process_resident_memory_bytes", "Resident memory size in bytes.", lambda: statm(1)
    )
    registry.gauge(
        "process_virtual_memory_bytes", "Virtual memory size in bytes.", lambda: statm(0)
    )
    registry.gauge("process_open_fds", "Number of open file descriptors.", open_fds)
    registry.gauge(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        lambda: float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    )
    registry.observed_counter(
        "process_cpu_seconds_total", "Total user and system CPU time in seconds.", cpu_seconds
    )
    registry.gauge(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        lambda: start,
    )


# -- the bridge -------------------------------------------------------------------------

#: Handshake failures with a fixed name; an HTTP refusal counts as ``http_<status>``.
HANDSHAKE_FAILURES = (
    "timeout",
    "malformed",
    "client_gone",
    "connection_limit",
    "evicted",
    "target_unavailable",
    "internal_error",
)


def refusal_kind(refusal: Refusal) -> str:
    """The ``reason`` label for a connection that ended before a request was parsed."""
    return refusal.kind


def close_code_label(code: int | None) -> str:
    """Close codes as a bounded label: clients choose 3000-4999 freely, so those are bucketed."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


class BridgeMetrics:
    """What :class:`~trio_bridge.server.Bridge` counts; rendered by :meth:`render`.

    The bridge calls :meth:`session_opened` / :meth:`session_closed` /
    :meth:`handshake_failed`; everything else is read when scraped.
    """

    def __init__(self, registry: Registry | None = None, *, process: bool = True) -> None:
        self.registry = registry = registry or Registry()
        self._open: dict[int, SessionStats] = {}
        self._closed_up = 0
        self._closed_down = 0
        registry.add(
            Observed(
                "trio_bridge_build_info",
                "The trio-bridge version, as a label.",
                "gauge",
                lambda: {(("version", _version()),): 1},
            )
        )
        registry.gauge(
            "trio_bridge_sessions_open", "WebSocket sessions relaying now.", lambda: len(self._open)
        )
        self.sessions = registry.counter(
            "trio_bridge_sessions_total",
            "WebSocket sessions opened (handshake done, target connected).",
        )
        registry.add(
            Observed(
                "trio_bridge_bytes_total",
                "Payload bytes relayed, by direction (live sessions included).",
                "counter",
                self._bytes,
            )
        )
        self.handshake_failures = registry.counter(
            "trio_bridge_handshake_failures_total",
            "Connections that ended before a session opened, by reason.",
            ("reason",),
        )
        for reason in HANDSHAKE_FAILURES:
            self.handshake_failures.inc(0, reason=reason)
        self.closes = registry.counter(
            "trio_bridge_sessions_closed_total",
            "Sessions ended, by WebSocket close code (3xxx/4xxx bucketed) and who closed.",
            ("code", "closed_by"),
        )
        self.recording_gaps = registry.counter(
            "trio_bridge_recording_gaps_total",
            "Gaps in session recordings: frames the recorder had to drop.",
        )
        if process:
            register_process_metrics(registry)

    # -- called by the server ---------------------------------------------------------

    def session_opened(self, stats: SessionStats) -> None:
        self._open[id(stats)] = stats
        self.sessions.inc()

    def session_closed(self, stats: SessionStats) -> None:
        if self._open.pop(id(stats), None) is None:
            return
        self._closed_up += stats.bytes_up
        self._closed_down += stats.bytes_down
        self.closes.inc(
            code=close_code_label(stats.close_code), closed_by=stats.closed_by or "none"
        )

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures.inc(reason=reason)

    # -- read at scrape time ----------------------------------------------------------

    def _bytes(self) -> dict[Labels, float]:
        up = self._closed_up + sum(stats.bytes_up for stats in self._open.values())
        down = self._closed_down + sum(stats.bytes_down for stats in self._open.values())
        return {
            (("direction", "client_to_target"),): up,
            (("direction", "target_to_client"),): down,
        }

    def render(self) -> str:
        return self.registry.render()


# -- the /metrics endpoint --------------------------------------------------------------

REQUEST_TIMEOUT = 10.0
MAX_CONCURRENT_SCRAPES = 16


class MetricsServer:
    """Serves ``GET /metrics`` on its own listening socket (``--metrics``).

    A separate port, not a path on the WebSocket port: metrics stay private to
    whoever can reach that address, whatever the public port serves.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._slots = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)
        self.address = ""

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[MetricsServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from .listeners import accept_forever, describe

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
        head = request.method == "HEAD"
        if split_target(request.path)[0] != "/metrics":
            return text_response(
                HTTPStatus.NOT_FOUND, "not found: metrics are at /metrics", head=head
            )
        if request.method not in SAFE_METHODS:
            return method_not_allowed(request.method)
        return http_response(
            HTTPStatus.OK,
            self.registry.render().encode(),
            content_type=CONTENT_TYPE,
            headers=[("Cache-Control", "no-store")],
            head=head,
        )


async def read_request(stream: trio.abc.ReceiveStream) -> Request | None:
    """One HTTP request head parsed by websockets (its line and header limits apply);
    None when the client sends something else or goes away."""
    reader = StreamReader()
    parser = Request.parse(reader.read_line)
    try:
        while True:
            next(parser)
            data = await stream.receive_some(4096)
            if data:
                reader.feed_data(data)
            else:
                reader.feed_eof()
    except StopIteration as done:
        request: Request = done.value
        return request
    except Exception:  # EOFError, SecurityError, ValueError, ...: not a request we answer
        return None
