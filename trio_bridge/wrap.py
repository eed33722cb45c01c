"""Wrap mode: start a program, relay to it, apply a policy when it exits, stop it with the bridge.

    trio-bridge 6080 --wrap-mode=respawn -- x11vnc -rfbport {port} -forever ...
    trio-bridge 6080 --wrap-stdio --wrap-mode=respawn -- bash -i

Two ways to reach the program:

- TCP (default): the program listens on a port, given on the command line as the
  target, or chosen free by the bridge and passed as ``{port}`` in the program's
  arguments and ``$TRIO_BRIDGE_TARGET_PORT``. The bridge relays only once the port is
  listening. Readiness is read from ``/proc/net/tcp*`` rather than probed with a
  connection: servers such as x11vnc count a probe as a client (and exit after it
  unless ``-forever``).
- stdio (``--wrap-stdio``): the program's stdin and stdout are the stream. One
  WebSocket session at a time is attached to them (others get 409); when it ends the
  program keeps running, like a serial console, and the next session continues where
  the last one left. The bridge reaches the pipes through a private Unix socket so
  the relay and its zero-copy path need no special case.

Policies, as websockify's ``--wrap-mode``: ``ignore`` (log the exit, keep serving;
sessions get 503), ``exit`` (stop the bridge; its exit status is the program's),
``respawn`` (start again after a back-off that doubles from 0.5 s up to 30 s and
resets once a run lasted 10 s).

The program runs in its own process group; stopping it (bridge shutdown, or after it
exits, for what it left behind) signals the whole group: SIGTERM, then SIGKILL after
``stop_timeout``. Its exit is always awaited, so no zombie is left, and so is the end
of every process in its group: none still runs once the bridge says it stopped. Its
stderr (and, in TCP mode, its stdout) goes to the log, line by line, at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TypeVar, cast

import trio
from websockets.http11 import Request

from .addresses import Address, TcpAddress, UnixAddress
from .config import WrapConfig, WrapMode
from .errors import StartupError
from .routing import HttpRefusal

log = logging.getLogger("trio_bridge.wrap")

PORT_PLACEHOLDER = "{port}"
PORT_ENV = "TRIO_BRIDGE_TARGET_PORT"
LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp
MAX_LOG_LINE = 4096
OUTPUT_GRACE = 1.0  # seconds to read a stopped program's last output
GROUP_EXIT_TIMEOUT = 2.0  # seconds for a SIGKILLed process group to be gone
# A pipe or socket that broke ends that direction of a stdio session, not the supervisor.
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


# -- processes ------------------------------------------------------------------------


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def exit_status(returncode: int) -> int:
    """The shell's convention: a program killed by signal N gives 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; zombies do not count (they are
    dead, waiting for a parent or init to reap them)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                # After the command's ")": state, ppid, pgrp, ...
                state, _, pgrp = file.read().rpartition(b")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return True
    return False


async def stop_process(process: trio.Process, timeout: float) -> None:
    """SIGTERM the program's group, SIGKILL it after ``timeout``, reap the program, and
    wait (up to ``GROUP_EXIT_TIMEOUT``) until nothing of its group runs.

    The last wait matters: SIGKILL is delivered at once but a process ends when it is
    next scheduled, so the program's children may still run for a moment after the
    program was reaped (still holding its port, for a respawn; still alive, to whoever
    checks). Runs shielded: it is called while the bridge is being cancelled, and
    leaving early would leave a running program (or a zombie) behind.
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            signal_group(process.pid, signal.SIGTERM)
            with trio.move_on_after(timeout):
                await process.wait()
        # Whatever is left in the group (the program, or children it left behind).
        signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        with trio.move_on_after(GROUP_EXIT_TIMEOUT):
            # Polled: no event tells when a process that is not our child ends.
            while group_running(process.pid):  # noqa: ASYNC110
                await trio.sleep(0.005)
            return
        log.warning(
            "process group %d still runs %g s after SIGKILL (uninterruptible sleep?)",
            process.pid,
            GROUP_EXIT_TIMEOUT,
        )


async def log_lines(stream: trio.abc.ReceiveStream, prefix: str) -> None:
    """Log a program's output line by line; a partial line is logged at EOF."""
    pending = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except BROKEN:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _log_line(prefix, line)
        while len(pending) > MAX_LOG_LINE:
            _log_line(prefix, pending[:MAX_LOG_LINE])
            pending = pending[MAX_LOG_LINE:]
    if pending:
        _log_line(prefix, pending)


def _log_line(prefix: str, line: bytes) -> None:
    log.info("%s: %s", prefix, line.rstrip(b"\r").decode("utf-8", "replace"))


# -- readiness ------------------------------------------------------------------------


def listening_ports() -> set[int]:
    """TCP ports in the LISTEN state in this network namespace (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                next(file, None)
                for line in file:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == LISTEN_STATE:
                        ports.add(int(fields[1].rpartition(":")[2], 16))
        except OSError:
            continue
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now; the program binds it a moment later."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NotReady(Exception):
    """The program did not become reachable; the message says why, for the log."""


# -- the supervisor -------------------------------------------------------------------


class Supervisor:
    """Runs the wrapped program for the bridge's lifetime and tells the bridge where it is.

    ``await nursery.start(supervisor.run)`` returns once the first run is reachable
    (or raises :class:`~trio_bridge.config.StartupError`); the supervisor is also the
    bridge's :class:`~trio_bridge.routing.TargetResolver` and a health check.
    ``on_exit`` is called in ``exit`` mode when the program ends.
    """

    POLL_INTERVAL = 0.05

    def __init__(
        self,
        config: WrapConfig,
        *,
        on_exit: Callable[[int], None] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.on_exit = on_exit
        self.connect_timeout = connect_timeout
        # With --wrap-stdio, a private socket in a folder that run() creates and removes.
        self.target: Address = (
            UnixAddress("")
            if config.stdio
            else config.target or TcpAddress("127.0.0.1", free_port())
        )
        self.command = self._command()
        self.name = shlex.join(self.command)
        self.starts = 0
        self.returncode: int | None = None
        self._process: trio.Process | None = None
        self._ready = trio.Event()
        self._state = "not started yet"
        self._next_start: float | None = None
        self._gone_for_good = False  # exited, and no restart will come
        # --wrap-stdio: one session at a time owns the pipes.
        self._attached = False
        self._claimed_until = -math.inf

    def _command(self) -> list[str]:
        if isinstance(self.target, TcpAddress):
            port = str(self.target.port)
            return [arg.replace(PORT_PLACEHOLDER, port) for arg in self.config.command]
        return list(self.config.command)

    # -- as seen by the bridge ------------------------------------------------------

    def __str__(self) -> str:
        return f"{self.name} on {self.target}"

    @property
    def running(self) -> bool:
        return self._ready.is_set()

    def health(self) -> str | None:
        """None while the program is up; otherwise what is wrong (for ``/healthz``)."""
        if self.running:
            return None
        return f"wrapped program {self.name} is {self._describe_state()}"

    def _describe_state(self) -> str:
        state = self._state
        if self._next_start is not None:
            wait = max(0.0, self._next_start - trio.current_time())
            state += f"; restarting in {wait:.1f} s"
        return state

    async def resolve(self, request: Request, client: str) -> Address:
        """The program's address once it is reachable; 503 if it is not within the
        connect timeout, 409 when a stdio program is already attached to a session."""
        if not self._gone_for_good:
            with trio.move_on_after(self.connect_timeout):
                await self._ready.wait()
        if not self.running:
            raise HttpRefusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"wrapped program {self.name} is {self._describe_state()}",
            )
        if self.config.stdio:
            now = trio.current_time()
            if self._attached or now < self._claimed_until:
                raise HttpRefusal(
                    HTTPStatus.CONFLICT,
                    "the wrapped program's stdin/stdout is in use by another session",
                )
            # Held until the bridge's connection arrives, or given up after the timeout.
            self._claimed_until = now + self.connect_timeout
        return self.target

    # -- lifecycle --------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.ExitStack() as cleanup:
            async with trio.open_nursery() as nursery:
                if self.config.stdio:
                    folder = cleanup.enter_context(
                        tempfile.TemporaryDirectory(prefix="trio-bridge-wrap-")
                    )
                    self.target = UnixAddress(os.path.join(folder, "stdio.sock"))
                    await nursery.start(self._serve_stdio)
                await self._supervise(task_status)
                nursery.cancel_scope.cancel()

    async def _supervise(self, task_status: trio.TaskStatus[Supervisor]) -> None:
        mode = self.config.mode
        delay = self.config.backoff_initial
        first = True
        while True:
            started = trio.current_time()
            try:
                returncode = await self._run_once(task_status if first else None)
            except NotReady as exc:
                if first:
                    raise StartupError(str(exc)) from None
                log.error("%s", exc)
                returncode = None
            first = False
            self.returncode = returncode
            self._gone_for_good = mode is not WrapMode.RESPAWN
            if mode is WrapMode.EXIT:
                if self.on_exit is not None:
                    self.on_exit(exit_status(returncode if returncode is not None else 1))
                return
            if mode is WrapMode.IGNORE:
                log.warning("wrap mode ignore: the bridge keeps serving without the program")
                await trio.sleep_forever()
            if trio.current_time() - started >= self.config.stable_after:
                delay = self.config.backoff_initial
            self._next_start = trio.current_time() + delay
            log.info("restarting %s in %.1f s", self.name, delay)
            await trio.sleep(delay)
            self._next_start = None
            delay = min(delay * 2, self.config.backoff_max)

    async def _run_once(self, task_status: trio.TaskStatus[Supervisor] | None) -> int:
        """Start the program, wait until it is reachable, then until it ends; stop it
        (and what it left in its process group) however this ends."""
        process = await self._spawn()
        try:
            await self._watch(process, task_status)
        except* NotReady as group:
            raise first_leaf(group) from None
        finally:
            self._process = None
            with trio.CancelScope(shield=True):
                for pipe in (process.stdin, process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
        assert process.returncode is not None
        return process.returncode

    async def _watch(
        self, process: trio.Process, task_status: trio.TaskStatus[Supervisor] | None
    ) -> None:
        """Log the program's output while waiting for it to be reachable, then to end."""
        async with trio.open_nursery() as output:
            prefix = f"{os.path.basename(self.command[0])}[{process.pid}]"
            assert process.stderr is not None and process.stdout is not None
            output.start_soon(log_lines, process.stderr, prefix)
            if not self.config.stdio:
                output.start_soon(log_lines, process.stdout, prefix)
            try:
                await self._wait_ready(process)
                self._state = "running"
                self._ready.set()
                if task_status is not None:
                    task_status.started(self)
                await process.wait()
            finally:
                if self._ready.is_set():
                    self._ready = trio.Event()
                stopping = process.returncode is None
                if stopping:
                    log.info("stopping %s (pid %d)", self.name, process.pid)
                await stop_process(process, self.config.stop_timeout)
                self._note_exit(process, stopped=stopping)
                # Log what is still in the pipes, but do not wait on a descendant
                # that left the process group and kept them open.
                output.cancel_scope.deadline = trio.current_time() + OUTPUT_GRACE

    async def _spawn(self) -> trio.Process:
        if isinstance(self.target, TcpAddress) and self.target.port in listening_ports():
            self._state = f"not started: port {self.target.port} is already in use"
            raise NotReady(
                f"cannot start {self.name}: something already listens on port {self.target.port}"
            )
        env = dict(os.environ)
        if isinstance(self.target, TcpAddress):
            env[PORT_ENV] = str(self.target.port)
        try:
            process = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.PIPE if self.config.stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, signalled as a whole
            )
        except OSError as exc:
            self._state = f"not started: {exc.strerror or exc}"
            raise NotReady(f"cannot start {self.name}: {exc.strerror or exc}") from exc
        self.starts += 1
        self._process = process
        self._state = "starting"
        log.info("started %s (pid %d)", self.name, process.pid)
        return process

    def _note_exit(self, process: trio.Process, *, stopped: bool) -> None:
        """Log how the program ended: a failure, unless the supervisor stopped it."""
        returncode = process.returncode
        assert returncode is not None
        self._state = f"not running: it {describe_status(returncode)}"
        level = logging.INFO if returncode == 0 or stopped else logging.WARNING
        log.log(level, "%s (pid %d) %s", self.name, process.pid, describe_status(returncode))

    async def _wait_ready(self, process: trio.Process) -> None:
        if not isinstance(self.target, TcpAddress):
            return
        port = self.target.port
        timeout = self.config.start_timeout
        with trio.move_on_after(timeout):
            while port not in listening_ports():
                if process.poll() is not None:
                    raise NotReady(
                        f"{self.name} {describe_status(process.returncode or 0)} "
                        f"before listening on {self.target}"
                    )
                await trio.sleep(self.POLL_INTERVAL)
            return
        raise NotReady(
            f"{self.name} did not listen on {self.target} within {timeout:g} s "
            f"(pass the port as {PORT_PLACEHOLDER} in its arguments or read ${PORT_ENV})"
        )

    # -- --wrap-stdio ---------------------------------------------------------------

    async def _serve_stdio(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert isinstance(self.target, UnixAddress)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(self.target.path)
            listener.listen(16)
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                stream = trio.SocketStream(sock)
                process = self._process
                if self._attached or process is None or not self.running:
                    await stream.aclose()
                    continue
                self._attached = True
                self._claimed_until = -math.inf
                try:
                    await self._attach(stream, process)
                finally:
                    self._attached = False

    async def _attach(self, stream: trio.SocketStream, process: trio.Process) -> None:
        """Relay one session to the program's stdin/stdout until either side ends.

        The session's end does not close the program's stdin: the program keeps
        running for the next session. The program's end (EOF on its stdout) ends the
        session, which then reports "target closed the connection".
        """
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin, process.stdout
        async with stream, trio.open_nursery() as nursery:

            async def upstream() -> None:
                with contextlib.suppress(*BROKEN):
                    while data := await stream.receive_some(65536):
                        await stdin.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                with contextlib.suppress(*BROKEN):
                    while data := await stdout.receive_some(65536):
                        await stream.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``6080 --wrap-mode=exit -- prog -x`` -> (``6080 --wrap-mode=exit``, ``prog -x``).

    Split before argparse sees the line: everything after the first ``--`` belongs to
    the program, including options that look like the bridge's own.
    """
    args = list(argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1 :]


E = TypeVar("E", bound=BaseException)


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception in a (nested) group, as nurseries wrap what their tasks raise."""
    leaf: BaseException | BaseExceptionGroup[E] = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return cast(E, leaf)
