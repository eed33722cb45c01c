"""Wrap mode with real programs: each policy, both ways to reach the program, programs
that die, never listen or ignore SIGTERM, and no process left behind."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from trio_bridge.addons import Addons, WrappedProgramExited
from trio_bridge.cli import build_parser, config_from_args
from trio_bridge.config import (
    Config,
    ConfigError,
    Limits,
    ServiceConfig,
    StartupError,
    TcpAddress,
    WrapConfig,
    WrapMode,
)
from trio_bridge.server import Bridge
from trio_bridge.wrap import (
    Supervisor,
    first_leaf,
    signal_group,
    split_command,
    stop_process,
)

from .conftest import LogWaiter, free_port, loopback_listener
from .test_web import fetch

ECHO_SERVER = """
    import os, socket, sys, threading
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["TRIO_BRIDGE_TARGET_PORT"])
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen()
    print("echo server up on", port, flush=True)
    print("a line on stderr", file=sys.stderr, flush=True)
    def echo(conn):
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

STDIO_ECHO = """
    import os, sys
    os.write(1, b"banner from pid %d\\n" % os.getpid())
    while data := os.read(0, 65536):
        os.write(1, data)
"""


def script(tmp_path: Path, name: str, source: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def is_zombie(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not alive(pid)


async def wait_group_gone(pgid: int) -> None:
    """Until no process of the group is left; killed orphans are reaped by init, soon."""
    with trio.fail_after(5):
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            await trio.sleep(0.02)


async def startup_error(supervisor: Supervisor) -> StartupError:
    """The StartupError ``nursery.start(supervisor.run)`` raises (inside the nursery's group)."""
    errors: list[BaseException] = []
    with trio.fail_after(10):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
        except* StartupError as group:
            errors.append(first_leaf(group))
    assert errors, "the supervisor started"
    assert isinstance(errors[0], StartupError)
    return errors[0]


class Wrapped:
    def __init__(self, addons: Addons, bridge: Bridge, port: int) -> None:
        self.addons = addons
        self.bridge = bridge
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/"
        self.done = trio.Event()
        self.exited: WrappedProgramExited | None = None

    @property
    def supervisor(self) -> Supervisor:
        assert self.addons.supervisor is not None
        return self.addons.supervisor

    @property
    def pid(self) -> int:
        process = self.supervisor._process
        assert process is not None
        return process.pid


Start = Callable[..., Awaitable[Wrapped]]


@pytest.fixture
async def start_wrapped(nursery: trio.Nursery) -> AsyncIterator[Start]:
    """``await start_wrapped(command, **wrap_fields)``: a bridge built as the CLI builds it."""
    started: list[Wrapped] = []

    async def start(command: list[str], **fields: Any) -> Wrapped:
        wrap = WrapConfig(tuple(command), **fields)
        config = Config(target=None, limits=Limits(close_timeout=0.5, shutdown_grace=1))
        addons = Addons(ServiceConfig(config, wrap=wrap))
        listener = loopback_listener()
        wrapped = Wrapped(addons, addons.bridge, listener.getsockname()[1])

        async def serve(task_status: trio.TaskStatus[Bridge]) -> None:
            try:
                await addons.serve([listener], task_status=task_status)
            except WrappedProgramExited as exc:
                wrapped.exited = exc
            finally:
                wrapped.done.set()

        await nursery.start(serve)
        started.append(wrapped)
        return wrapped

    yield start
    for wrapped in started:  # the program must be gone whatever the test did
        wrapped.bridge.request_shutdown()
        with trio.fail_after(10):
            await wrapped.done.wait()


async def read_line(ws: ClientConnection) -> bytes:
    """Up to a newline: a byte stream has no message boundaries to rely on."""
    line = b""
    while not line.endswith(b"\n"):
        data = await ws.recv()
        assert isinstance(data, bytes)
        line += data
    return line


async def echo_once(ws: ClientConnection, payload: bytes) -> None:
    await ws.send(payload)
    got = b""
    while len(got) < len(payload):
        data = await ws.recv()
        assert isinstance(data, bytes)
        got += data
    assert got == payload


# -- TCP mode ----------------------------------------------------------------------------


async def test_tcp_mode_picks_a_port_passes_it_and_logs_the_output(
    start_wrapped: Start, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped([*script(tmp_path, "echo.py", ECHO_SERVER), "{port}"])
        target = wrapped.supervisor.target
        assert isinstance(target, TcpAddress)
        await bridge_log.wait_for(f"echo server up on {target.port}", logger="trio_bridge.wrap")
        await bridge_log.wait_for("a line on stderr", logger="trio_bridge.wrap")
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await echo_once(ws, b"to the wrapped program")
        assert (await fetch(wrapped.port, "/healthz")).status == 200


async def test_tcp_mode_port_from_the_environment_and_a_given_target(
    start_wrapped: Start, tmp_path: Path
) -> None:
    port = free_port()
    with trio.fail_after(20):
        wrapped = await start_wrapped(
            script(tmp_path, "echo.py", ECHO_SERVER), target=TcpAddress("127.0.0.1", port)
        )
        assert wrapped.supervisor.target == TcpAddress("127.0.0.1", port)
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await echo_once(ws, b"via $TRIO_BRIDGE_TARGET_PORT")


async def test_program_that_never_listens_is_a_clear_startup_error(tmp_path: Path) -> None:
    never = script(
        tmp_path, "never.py", "import time\nprint('not listening', flush=True)\ntime.sleep(60)\n"
    )
    supervisor = Supervisor(WrapConfig(tuple(never), start_timeout=0.5, stop_timeout=1))
    failed = str(await startup_error(supervisor))
    assert "did not listen on 127.0.0.1:" in failed
    assert "within 0.5 s" in failed
    assert "{port}" in failed  # says how to pass the port
    assert supervisor._process is None
    assert supervisor.starts == 1


async def test_program_that_exits_before_listening(tmp_path: Path) -> None:
    failing = ["sh", "-c", "echo cannot bind >&2; exit 2"]
    supervisor = Supervisor(WrapConfig(tuple(failing)))
    assert "exited with status 2 before listening" in str(await startup_error(supervisor))


async def test_port_already_taken_and_missing_program(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        supervisor = Supervisor(WrapConfig(("true",), target=TcpAddress("127.0.0.1", port)))
        assert "already listens on port" in str(await startup_error(supervisor))
    assert supervisor.starts == 0
    missing = Supervisor(WrapConfig((str(tmp_path / "no-such-program"),)))
    failed = str(await startup_error(missing))
    assert "cannot start" in failed
    assert "No such file" in failed


# -- stdio mode --------------------------------------------------------------------------


async def test_stdio_mode_one_program_across_sessions(start_wrapped: Start, tmp_path: Path) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(script(tmp_path, "stdio.py", STDIO_ECHO), stdio=True)
        pid = wrapped.pid
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            # Output written before anyone attached waited in the pipe.
            assert await read_line(ws) == b"banner from pid %d\n" % pid
            await echo_once(ws, b"first session\n")
            # One session at a time owns stdin/stdout.
            with pytest.raises(InvalidStatus) as busy:
                async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]):
                    pass
            assert busy.value.response.status_code == 409
        # The session ended; the program did not.
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await echo_once(ws, b"second session, same program\n")
        assert wrapped.pid == pid
        assert wrapped.supervisor.starts == 1


async def test_stdio_program_exit_closes_the_session(start_wrapped: Start) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(
            ["sh", "-c", "read line; echo bye; exit 0"], stdio=True, mode=WrapMode.IGNORE
        )
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await ws.send(b"hello\n")
            assert await read_line(ws) == b"bye\n"
            with pytest.raises(Exception, match="target closed the connection"):
                await ws.recv()


# -- policies ------------------------------------------------------------------------------


async def test_exit_mode_stops_the_bridge_with_the_programs_status(start_wrapped: Start) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(["sh", "-c", "read line; exit 3"], stdio=True)
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await ws.send(b"go\n")
            with pytest.raises(Exception, match="target closed the connection"):
                await ws.recv()
        await wrapped.done.wait()
    assert wrapped.exited is not None
    assert wrapped.exited.status == 3


async def test_ignore_mode_keeps_serving_without_the_program(
    start_wrapped: Start, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(
            [*script(tmp_path, "echo.py", ECHO_SERVER), "{port}"], mode=WrapMode.IGNORE
        )
        os.kill(wrapped.pid, signal.SIGKILL)
        await bridge_log.wait_for("was killed by SIGKILL", logger="trio_bridge.wrap")
        health = await fetch(wrapped.port, "/healthz")
        assert health.status == 503
        assert b"was killed by SIGKILL" in health.body
        with pytest.raises(InvalidStatus) as refused:
            async with connect(wrapped.url, subprotocols=[Subprotocol("binary")], open_timeout=15):
                pass
        assert refused.value.response.status_code == 503
        assert not wrapped.done.is_set()
        assert wrapped.supervisor.starts == 1


async def test_respawn_mode_restarts_the_program(
    start_wrapped: Start, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(
            [*script(tmp_path, "echo.py", ECHO_SERVER), "{port}"],
            mode=WrapMode.RESPAWN,
            backoff_initial=0.2,
        )
        first = wrapped.pid
        os.kill(first, signal.SIGTERM)
        await bridge_log.wait_for("restarting", "in 0.2 s", logger="trio_bridge.wrap")
        # A session that arrives meanwhile waits for the new program (up to connect_timeout).
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            await echo_once(ws, b"after a respawn")
        assert wrapped.supervisor.starts == 2
        assert wrapped.pid != first
        assert not alive(first)
        assert not is_zombie(first)


async def test_respawn_backs_off_exponentially(start_wrapped: Start, bridge_log: LogWaiter) -> None:
    with trio.fail_after(20):
        await start_wrapped(
            ["sh", "-c", "exit 1"], stdio=True, mode=WrapMode.RESPAWN, backoff_initial=0.1
        )
        for delay in ("0.1", "0.2", "0.4", "0.8"):
            await bridge_log.wait_for("restarting", f"in {delay} s", logger="trio_bridge.wrap")
    starts = [
        record.created
        for record in bridge_log.caplog.records
        if record.name == "trio_bridge.wrap" and record.getMessage().startswith("started")
    ]
    # Each start came at least the announced delay after the one before. (Comparing the
    # gaps with each other failed now and then on a loaded machine, where starting
    # ``sh`` alone can take 0.1 s: 0.11, 0.30, 0.43 s.)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) >= 3
    for gap, announced in zip(gaps, (0.1, 0.2, 0.4), strict=False):
        assert gap >= announced * 0.99, gaps


# -- stopping ----------------------------------------------------------------------------

STUBBORN = """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    print("child", child.pid, flush=True)
    sys.stdin.read()
    time.sleep(300)
"""


async def test_shutdown_stops_the_program_and_its_children(
    start_wrapped: Start, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(20):
        wrapped = await start_wrapped(
            script(tmp_path, "stubborn.py", STUBBORN), stdio=True, stop_timeout=0.5
        )
        pid = wrapped.pid
        async with connect(wrapped.url, subprotocols=[Subprotocol("binary")]) as ws:
            line = await read_line(ws)
        child = int(line.split()[1])
        assert alive(child)
        wrapped.bridge.request_shutdown()
        await wrapped.done.wait()
        # It ignored SIGTERM: SIGKILL after stop_timeout, for the whole group.
        await bridge_log.wait_for(f"(pid {pid}) was killed by SIGKILL", logger="trio_bridge.wrap")
    assert not alive(pid) and not is_zombie(pid)
    assert not alive(child)
    await wait_group_gone(pid)
    assert wrapped.exited is None  # asked to stop: not a program exit


async def test_stop_process_returns_once_nothing_of_the_group_runs() -> None:
    """SIGKILL reaches the whole group at once, but each process ends when it is next
    scheduled: reaping the program alone left its children running for a moment (seen
    as test_shutdown_stops_the_program_and_its_children failing now and then). Several
    rounds, since the window is short: on the 2-core VM about half the rounds caught a
    child still running right after the program was reaped."""
    leader = (
        "import subprocess, sys\n"
        "print(subprocess.Popen(['sleep', '300']).pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    for _ in range(20):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", leader],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            with trio.fail_after(10):
                assert process.stdout is not None
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some()
                    assert chunk, line
                    line += chunk
                child = int(line)
                await stop_process(process, timeout=0)  # straight to SIGKILL
            assert not alive(process.pid) and not alive(child)
        finally:
            signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            for pipe in (process.stdin, process.stdout):
                assert pipe is not None
                await pipe.aclose()


# -- the command line ----------------------------------------------------------------------


def cli_config(*argv: str) -> ServiceConfig:
    args_list, command = split_command(argv)
    args = build_parser().parse_args(args_list)
    args.wrap_command = command
    return config_from_args(args)


def test_command_line_forms() -> None:
    config = cli_config("6080", "--", "prog", "--verbose", "{port}")
    assert config.bridge.target is None
    assert config.wrap == WrapConfig(("prog", "--verbose", "{port}"), WrapMode.EXIT)
    config = cli_config("6080", "localhost:5901", "--wrap-mode=respawn", "--", "x11vnc")
    assert config.wrap is not None
    assert config.wrap.target == TcpAddress("localhost", 5901)
    assert config.wrap.mode is WrapMode.RESPAWN
    assert cli_config("6080", "--wrap-stdio", "--", "bash", "-i").wrap == WrapConfig(
        ("bash", "-i"), stdio=True
    )
    with pytest.raises(ConfigError, match="need a program"):
        cli_config("6080", "localhost:5901", "--wrap-mode=ignore")
    with pytest.raises(ConfigError, match="give no target"):
        cli_config("6080", "localhost:5901", "--wrap-stdio", "--", "cat")


class Cli:
    """``python -m trio_bridge.cli ARGS`` with its log (stdout and stderr) collected."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""

    async def wait_for(self, fragment: bytes) -> None:
        assert self.process.stdout is not None
        while fragment not in self.output:
            chunk = await self.process.stdout.receive_some(65536)
            assert chunk, self.output.decode()
            self.output += chunk

    async def exit_status(self) -> int:
        assert self.process.stdout is not None
        async for chunk in self.process.stdout:
            self.output += chunk
        return await self.process.wait()

    def program_pid(self) -> int:
        found = re.search(rb"\(pid (\d+)\)", self.output)
        assert found, self.output.decode()
        return int(found[1])


@asynccontextmanager
async def cli(*argv: str) -> AsyncIterator[Cli]:
    """Always ends with no process left: the bridge, and any program it started."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_bridge.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    running = Cli(process)
    try:
        yield running
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            for pid in re.findall(rb"\(pid (\d+)\)", running.output):
                signal_group(int(pid), signal.SIGKILL)
            assert process.stdout is not None
            await process.stdout.aclose()


async def test_cli_exit_mode_exits_with_the_programs_status() -> None:
    async with cli(str(free_port()), "--wrap-stdio", "--", "sh", "-c", "sleep 0.3; exit 7") as run:
        with trio.fail_after(20):
            status = await run.exit_status()
        assert status == 7, run.output.decode()
        assert b"exited with status 7" in run.output


async def test_cli_sigterm_stops_bridge_and_program() -> None:
    argv = ("--wrap-stdio", "--wrap-mode=respawn", "--", "sleep", "300")
    async with cli(str(free_port()), *argv) as run:
        with trio.fail_after(20):
            await run.wait_for(b"relaying to")
            pid = run.program_pid()
            assert alive(pid)
            run.process.send_signal(signal.SIGTERM)
            assert await run.exit_status() == 0, run.output.decode()
            assert not alive(pid) and not is_zombie(pid)
            await wait_group_gone(pid)


async def test_cli_sigterm_while_waiting_for_the_program_to_listen() -> None:
    """Starting can wait 30 s for the port; a stop request must not wait with it."""
    async with cli(str(free_port()), "--", "sleep", "300") as run:
        with trio.fail_after(20):
            await run.wait_for(b"started sleep 300")
            pid = run.program_pid()
            run.process.send_signal(signal.SIGTERM)
            assert await run.exit_status() == 0, run.output.decode()
            assert not alive(pid) and not is_zombie(pid)
