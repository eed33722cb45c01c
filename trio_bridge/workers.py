"""``--workers N``: N bridge processes accepting on the same listening sockets.

One process uses one core; past one core's worth of busy sessions, more processes
serve more. The main process (this module) holds the listening sockets, inherited from
systemd or bound by itself, and starts N workers. Each worker is this same program,
handed those sockets the way a socket-activated bridge is, with the main process in
systemd's place:

- **Sockets.** The worker finds them in ``TRIO_BRIDGE_WORKER_FDS`` (``ws:5,metrics:7``)
  instead of ``LISTEN_FDS`` (which must start at fd 3 and name the receiving pid).
- **Notifications.** ``NOTIFY_SOCKET`` names an abstract Unix datagram socket of the
  main process: a worker's READY, STATUS, STOPPING and WATCHDOG arrive there. The main
  process tells systemd READY once every worker serves, STATUS with the totals, and
  pings systemd's watchdog only while every worker pings its own (a worker silent for
  :data:`HUNG_AFTER` seconds is killed and restarted).
- **Metrics.** Each worker serves its metrics on a private abstract Unix socket; the
  main process's ``/metrics`` scrapes them all and adds the samples up.
- **Signals.** SIGTERM/SIGINT and SIGHUP are passed on (the workers drain and reload as
  one bridge does); a worker that dies is restarted with back-off.

Why one shared listening socket, not ``SO_REUSEPORT`` groups: systemd passes one socket
per ``ListenStream=``, so the shipped units can only share it, and one code path serves
both ways of starting. Every worker waits for it in epoll; the first to accept gets the
connection (docs/scaling.md has the measured spread).

- **Per-address limits.** ``--max-connections-per-address`` and ``--connection-rate``
  hold across workers: each worker asks the main process (:class:`AdmissionDesk`, one
  :class:`~trio_bridge.limits.AddressLimiter` for all) over a socket pair before it
  admits a limited address, and tells it when the connection ends; a worker that dies
  has its connections released. An exempt address (loopback by default) costs no
  question. ``--max-connections`` and ``--max-handshakes`` stay per worker.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from .activation import InheritedSockets, Role, adopt
from .limits import AddressLimiter, Admission
from .routing import HttpRefusal
from .systemd import STATUS_INTERVAL, Notifier, monotonic_usec, watchdog_interval

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from .addons import Addons
    from .config import Config, ServiceConfig

log = logging.getLogger("trio_bridge.workers")

WORKER_FDS = "TRIO_BRIDGE_WORKER_FDS"
WORKER_OF = "TRIO_BRIDGE_WORKER_OF"  # the main process's pid
WORKER_LIMITS = "TRIO_BRIDGE_WORKER_LIMITS"  # the worker's end of its admission socket pair
ASK_TIMEOUT = 2.0  # a main process this slow to answer is not waited for: admit
PING_EVERY = 1.0  # a worker's watchdog interval (it pings twice as often as required)
HUNG_AFTER = 10.0
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 10.0
SCRAPE_TIMEOUT = 5.0


def worker_count(text: str) -> int:
    """``--workers``: a number >= 1, or ``auto`` (one per CPU this process may use)."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


def sockets_from_main() -> InheritedSockets | None:
    """In a worker: the listening sockets the main process passed; None elsewhere."""
    spec = os.environ.pop(WORKER_FDS, "")
    if not spec:
        return None
    inherited = InheritedSockets("the main process")
    for item in spec.split(","):
        name, _, fd = item.partition(":")
        sock, role = adopt(int(fd), name, (Role.WS, Role.WSS, Role.METRICS))
        inherited.listeners.setdefault(role, []).append(sock)
        inherited.descriptions.append(f"fd {fd} ({role.value})")
    return inherited


@dataclass
class Worker:
    """One worker process and what it last told the main process."""

    index: int
    notify: trio.socket.SocketType  # bound to the abstract address notify_address
    notify_address: str
    metrics: socket.socket  # the private socket the worker serves its metrics on
    metrics_address: str
    process: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    sessions: int = 0
    last_ping: float = -math.inf


class WorkerPool:
    """Starts, watches and stops the workers; speaks for them to systemd."""

    def __init__(
        self,
        argv: Sequence[str],
        count: int,
        listeners: Sequence[tuple[Role, socket.socket]],
        desk: AdmissionDesk,
    ) -> None:
        self.argv = [*argv, "--workers", "1"]  # the last --workers wins
        self.desk = desk
        self.count = count
        self.listeners = list(listeners)
        self.workers: list[Worker] = []
        self.notifier = Notifier.from_environment()
        self.stopping = False
        self.failed_to_start: str | None = None

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, metrics_listeners: Sequence[socket.socket] = ()) -> int:
        """Serve until SIGTERM/SIGINT and every worker has drained; the exit status."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals)
                for listener in metrics_listeners:
                    nursery.start_soon(self._serve_metrics, listener)
                for index in range(self.count):
                    self.workers.append(await self._new_worker(index))
                nursery.start_soon(self._announce_ready)
                async with trio.open_nursery() as keepers:
                    for worker in self.workers:
                        keepers.start_soon(self._keep, worker)
                nursery.cancel_scope.cancel()  # every worker has exited for good
        if self.failed_to_start is not None:
            log.error("%s", self.failed_to_start)
            return 1
        return 0

    async def _new_worker(self, index: int) -> Worker:
        # Abstract addresses: no file to create (ProtectSystem=strict) or to clean up.
        notify_address = f"\0trio-bridge-{os.getpid()}-notify-{index}"
        notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await notify.bind(notify_address)
        metrics_address = f"\0trio-bridge-{os.getpid()}-metrics-{index}"
        metrics = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        metrics.bind(metrics_address)
        metrics.listen(16)
        return Worker(index, notify, notify_address, metrics, metrics_address)

    async def _keep(self, worker: Worker) -> None:
        """Run the worker; restart it with back-off when it dies, until stopping."""
        delay = BACKOFF_FIRST
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, worker)
            while True:
                started = trio.current_time()
                status = await self._run_once(worker)
                if self.stopping:
                    break
                if not worker.ready.is_set():
                    self.failed_to_start = (
                        f"worker {worker.index} exited with status {status} before serving; "
                        "stopping (its log above says why)"
                    )
                    self.stopping = True
                    self._signal_all(signal.SIGTERM)
                    break
                if trio.current_time() - started >= STABLE_AFTER:
                    delay = BACKOFF_FIRST
                log.warning(
                    "worker %d exited with status %s; restarting it in %g s",
                    worker.index,
                    status,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            nursery.cancel_scope.cancel()

    async def _run_once(self, worker: Worker) -> int:
        desk_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.desk.serve, trio.socket.from_stdlib_socket(desk_end))
                status = await self._spawn(worker, worker_end)
                nursery.cancel_scope.cancel()  # its connections are released
            return status
        finally:
            worker_end.close()

    async def _spawn(self, worker: Worker, limits: socket.socket) -> int:
        fds = [(role, sock.fileno()) for role, sock in self.listeners]
        fds.append((Role.METRICS, worker.metrics.fileno()))
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))
        }
        env[WORKER_FDS] = ",".join(f"{role.value}:{fd}" for role, fd in fds)
        env[WORKER_OF] = str(os.getpid())
        env[WORKER_LIMITS] = str(limits.fileno())
        env["NOTIFY_SOCKET"] = "@" + worker.notify_address[1:]  # sd_notify's abstract form
        env["WATCHDOG_USEC"] = str(int(PING_EVERY * 2e6))
        worker.last_ping = trio.current_time()
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_bridge.cli", *self.argv],
            pass_fds=[*(fd for _, fd in fds), limits.fileno()],
            env=env,
            process_group=0,  # a terminal's Ctrl-C reaches the main process only
        )
        limits.close()  # the worker's now; the desk sees EOF when the worker is gone
        worker.process = process
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        try:
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    async def _listen(self, worker: Worker) -> None:
        """The worker's sd_notify datagrams: READY, STATUS, WATCHDOG."""
        while True:
            message = (await worker.notify.recv(4096)).decode("utf-8", "replace")
            for line in message.splitlines():
                name, _, value = line.partition("=")
                if name == "READY" and value == "1":
                    worker.ready.set()
                elif name == "STATUS":
                    sessions = re.match(r"(?:draining: )?(\d+) session", value)
                    worker.sessions = int(sessions.group(1)) if sessions else worker.sessions
                elif name == "WATCHDOG" and value == "1":
                    worker.last_ping = trio.current_time()

    async def _announce_ready(self) -> None:
        for worker in self.workers:
            await worker.ready.wait()
        log.info("%d workers serving", len(self.workers))
        self.notifier.send(READY="1", STATUS=self.status())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_status)
            interval = watchdog_interval()
            nursery.start_soon(self._watch_workers, interval)

    def status(self) -> str:
        sessions = sum(worker.sessions for worker in self.workers)
        prefix = "draining: " if self.stopping else ""
        plural = "" if sessions == 1 else "s"
        return f"{prefix}{sessions} session{plural} open in {self.count} workers"

    async def _report_status(self) -> None:
        last = ""
        while True:
            await trio.sleep(STATUS_INTERVAL)
            if (status := self.status()) != last:
                last = status
                self.notifier.send(STATUS=status)

    async def _watch_workers(self, systemd_interval: float | None) -> None:
        """Ping systemd only while every worker pings; kill a worker that stopped."""
        while True:
            now = trio.current_time()
            hung = [w for w in self.workers if now - w.last_ping > HUNG_AFTER]
            for worker in hung:
                if worker.process is not None and worker.process.returncode is None:
                    log.error(
                        "worker %d sent no watchdog ping for %g s; killing it",
                        worker.index,
                        HUNG_AFTER,
                    )
                    worker.process.kill()
            if systemd_interval is not None and not hung:
                self.notifier.send(WATCHDOG="1")
            await trio.sleep(min(systemd_interval or PING_EVERY, PING_EVERY))

    # -- signals -------------------------------------------------------------------------

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        received = 0
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.notifier.send(RELOADING="1", MONOTONIC_USEC=str(monotonic_usec()))
                self._signal_all(signal.SIGHUP)
                self.notifier.send(READY="1", STATUS=self.status())
                continue
            received += 1
            name = signal.Signals(signum).name
            if received == 1:
                log.info("received %s: the workers drain", name)
                self.stopping = True
                self.notifier.send(STOPPING="1", STATUS=self.status())
            # Passed on each time: a worker's second and third ones close and stop now.
            self._signal_all(signal.SIGTERM if received < 3 else signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                process.send_signal(signum)

    # -- metrics -------------------------------------------------------------------------

    async def _serve_metrics(self, listener: socket.socket) -> None:
        from .metrics import MetricsServer

        totals = WorkerTotals(self)
        await MetricsServer(totals.registry(), before_scrape=totals.refresh).serve(listener)


class WorkerTotals:
    """A prometheus_client collector: every worker's samples, added up at scrape time."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.texts: list[str] = []

    def registry(self) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    async def refresh(self) -> None:
        texts: list[str] = []
        with trio.move_on_after(SCRAPE_TIMEOUT):
            for worker in self.pool.workers:
                texts.append(await scrape(worker.metrics_address))
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values[key].append(sample.value)
        for (family_name, sample_name, labels), found in values.items():
            families[family_name].add_sample(sample_name, dict(labels), combine(sample_name, found))
        yield from families.values()


def combine(sample: str, values: list[float]) -> float:
    """Totals across workers; what is per process (a start time, a limit) is not a sum."""
    if sample.endswith("_info") or sample == "process_max_fds":
        return max(values)
    if sample == "process_start_time_seconds":
        return min(values)
    return sum(values)


async def scrape(address: str) -> str:
    """One worker's exposition, over its private Unix socket."""
    stream = await trio.open_unix_socket(address)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
        chunks = [chunk async for chunk in stream]
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else ""


# -- the two ends ------------------------------------------------------------------------


def serve_with_workers(
    service: ServiceConfig, inherited: InheritedSockets | None, argv: Sequence[str]
) -> int:
    """The main process: the listening sockets, then the workers until they stop."""
    from .listeners import bind

    if inherited is not None:
        listeners = [(Role.WS, s) for s in inherited.listening(Role.WS)]
        listeners += [(Role.WSS, s) for s in inherited.listening(Role.WSS)]
        metrics = inherited.listening(Role.METRICS)
    else:
        bridge = service.bridge
        listeners = [(Role.WS, bind(bridge.listen, bridge.unix_listen_mode))]
        metrics = []
    if not metrics and service.metrics_listen is not None:  # as Addons does
        metrics = [bind(service.metrics_listen)]
    desk = AdmissionDesk(AddressLimiter.for_config(service.bridge))
    pool = WorkerPool(argv, service.workers, listeners, desk)
    return trio.run(pool.run, metrics)


async def run_worker(addons: Addons, inherited: InheritedSockets | None) -> None:
    """A worker: the bridge as one process runs it, stopped if the main process dies
    (its sockets would otherwise keep accepting with nobody supervising)."""
    from .service import run

    parent = int(os.environ.pop(WORKER_OF))  # not getppid(): the main may be gone already
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_when_orphaned, parent)
        limiter = addons.bridge.address_limits
        if isinstance(limiter, SharedAddressLimiter):
            nursery.start_soon(limiter.run)
        await run(addons, inherited)
        nursery.cancel_scope.cancel()


async def _stop_when_orphaned(parent: int) -> None:
    # Polled: Linux tells a process its parent died only through prctl(PR_SET_PDEATHSIG),
    # which needs ctypes; once a second is soon enough for a supervisor's crash.
    while os.getppid() == parent:  # noqa: ASYNC110
        await trio.sleep(1)
    log.warning("the main process (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)  # the drain a SIGTERM starts


# -- per-address limits across workers -----------------------------------------------------


class AdmissionDesk:
    """In the main process: the one count per address for every worker.

    A worker's question is ``A <id> <key> <peer>``, answered ``Y <id>`` or ``N <id>``
    with the refusal as JSON; ``R <key>`` ends one of its admitted connections. The
    socket pair is the worker's for its life: when it is gone, everything it held is
    released.
    """

    def __init__(self, limiter: AddressLimiter) -> None:
        self.limiter = limiter

    async def serve(self, channel: trio.socket.SocketType) -> None:
        held: dict[str, list[Admission]] = defaultdict(list)
        try:
            with channel:
                while message := await channel.recv(4096):
                    kind, _, rest = message.decode().partition("\t")
                    if kind == "A":
                        ident, key, peer = rest.split("\t", 2)
                        answer = self.limiter.admit_key(key, peer)  # logs its refusals
                        if isinstance(answer, HttpRefusal):
                            refusal = [answer.status, answer.reason, answer.headers]
                            reply = f"N\t{ident}\t{json.dumps(refusal)}"
                        else:
                            held[key].append(answer)
                            reply = f"Y\t{ident}"
                        await channel.send(reply.encode())
                    elif kind == "R" and held[rest]:
                        held[rest].pop().release()
        finally:
            for admissions in held.values():
                for admission in admissions:
                    admission.release()


class SharedAddressLimiter(AddressLimiter):
    """In a worker: the keys are computed here, the counting is the main process's."""

    def connect(self, fd: int) -> None:
        self._channel = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        self._asks = itertools.count()
        self._answers: dict[int, list[Any]] = {}  # id -> [answered, answer]
        self._releases: list[str] = []
        self._release_wanted = trio.Event()

    async def admit_connection(self, sock: socket.socket, peer: str) -> Admission | HttpRefusal:
        return await self._ask(self.key_of(sock), peer)

    async def admit_client(self, address: str | None, peer: str) -> Admission | HttpRefusal:
        return await self._ask(self.key_of_address(address), peer)

    async def _ask(self, key: str | None, peer: str) -> Admission | HttpRefusal:
        if key is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return Admission(None, None)
        ident = next(self._asks)
        waiter: list[Any] = [trio.Event(), None]
        self._answers[ident] = waiter
        try:
            await self._channel.send(f"A\t{ident}\t{key}\t{peer}".encode())
            with trio.move_on_after(ASK_TIMEOUT):
                await waiter[0].wait()
        finally:
            del self._answers[ident]
        answer = waiter[1]
        if answer is None:  # better one connection over its limit than none served
            log.warning("the main process did not answer in %g s: %s admitted", ASK_TIMEOUT, peer)
            return Admission(None, None)
        if answer == "":
            return Admission(self, key)
        status, reason, headers = json.loads(answer)
        return HttpRefusal(status, reason, [tuple(header) for header in headers])

    def _release(self, key: str) -> None:
        self._releases.append(key)  # sent by run(): this is called outside any task
        self._release_wanted.set()

    async def run(self) -> NoReturn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_releases)
            while message := await self._channel.recv(4096):
                kind, _, rest = message.decode().partition("\t")
                ident, _, refusal = rest.partition("\t")
                waiter = self._answers.get(int(ident))
                if waiter is not None:
                    waiter[1] = "" if kind == "Y" else refusal
                    waiter[0].set()
            raise RuntimeError("the main process closed the admission channel")

    async def _send_releases(self) -> None:
        while True:
            await self._release_wanted.wait()
            self._release_wanted = trio.Event()
            releases, self._releases = self._releases, []
            for key in releases:
                await self._channel.send(f"R\t{key}".encode())


def limiter_from_main(config: Config) -> SharedAddressLimiter | None:
    """In a worker: the per-address limits shared through the main process."""
    fd = os.environ.pop(WORKER_LIMITS, "")
    if not fd:
        return None
    limiter = SharedAddressLimiter.for_config(config)
    limiter.connect(int(fd))
    return limiter
