"""The bridge as a systemd service, with real binaries and no mock of systemd.

- Socket activation through the real ``systemd-socket-activate`` (one socket, several
  named ones, ``--accept`` and ``--inetd``), relaying through websockets' Trio client.
- sd_notify through an AF_UNIX datagram socket the test owns, as systemd owns its own:
  READY, STATUS, WATCHDOG, RELOADING (with MONOTONIC_USEC), STOPPING and their order.
- A restart on a listening socket the test holds, as systemd holds trio-bridge.socket.
- The journal through its native protocol, received by the test in place of journald.
- The cold-start time of an activated bridge (``python -m tests.test_systemd [RUNS]``
  prints the series quoted in docs/performance.md).

Processes run in their own process group and the group is killed in teardown;
readiness is awaited from log lines or notify messages, never with sleeps.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect, unix_connect
from websockets.typing import Subprotocol

from trio_bridge import systemd as sd

from .conftest import TcpTarget, echo, free_port
from .security_support import Pki
from .security_support import pki as pki  # the fixture

BRIDGE = str(Path(sys.executable).with_name("trio-bridge"))
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate (package systemd) is not installed"
)
TIMEOUT = 15  # seconds, for each test as a whole

# Variables that would make a child think it runs under the test runner's own systemd.
SYSTEMD_VARIABLES = {
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
}

# What systemd does between fork and exec: the sockets become fds 3, 4, ...; LISTEN_FDS
# counts them; LISTEN_PID (and WATCHDOG_PID) name the process, which stays this one
# through execv. Usage: python -c ACTIVATE "7,9" program args...
ACTIVATE = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",") if fd]
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(parked):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(parked))
os.environ["LISTEN_PID"] = str(os.getpid())
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update(extra)
    return env


def activated(fds: Sequence[int], argv: Sequence[str]) -> list[str]:
    """``argv`` started with ``fds`` handed over as systemd hands them (see ACTIVATE)."""
    return [sys.executable, "-I", "-S", "-c", ACTIVATE, ",".join(map(str, fds)), *argv]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path: AF_UNIX paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- child processes -----------------------------------------------------------------------


class Child:
    """A running program whose stderr is collected, so a test can await a log line."""

    def __init__(self, process: trio.Process, stderr: trio.lowlevel.FdStream) -> None:
        self.process = process
        self.stderr = ""
        self.closed = False
        self._stream = stderr
        self._changed = trio.Event()

    async def _collect(self) -> None:
        async with self._stream:
            async for chunk in self._stream:
                self.stderr += chunk.decode("utf-8", "replace")
                self._changed.set()
                self._changed = trio.Event()
        self.closed = True
        self._changed.set()

    async def wait_until(self, condition: Callable[[str], bool]) -> None:
        while not condition(self.stderr):
            if self.closed:
                raise AssertionError(f"never happened; stderr was:\n{self.stderr}")
            await self._changed.wait()

    async def wait_for_output(self, *fragments: str) -> None:
        await self.wait_until(lambda text: all(fragment in text for fragment in fragments))

    async def exit_status(self) -> int:
        status = await self.process.wait()
        await self.wait_until(lambda _: self.closed)  # the rest of stderr, for assertions
        return status

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    journal_stream: bool = False,
) -> AsyncIterator[Child]:
    """Run ``argv`` in its own process group, killed with the group on exit.

    ``journal_stream``: set JOURNAL_STREAM to the stderr pipe's device and inode, which
    is how systemd tells a service that its stderr is connected to journald.
    """
    env = clean_env() if env is None else dict(env)
    read_end, write_end = os.pipe()
    if journal_stream:
        st = os.fstat(write_end)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=env,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    finally:
        os.close(write_end)
    child = Child(process, trio.lowlevel.FdStream(read_end))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(child._collect)
        try:
            yield child
        finally:
            with trio.CancelScope(shield=True):
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def socket_activate(
    listen: Sequence[str], argv: Sequence[str], *options: str
) -> AsyncIterator[Child]:
    """``systemd-socket-activate --listen=ADDR ... [options] argv``, once it listens."""
    assert SOCKET_ACTIVATE is not None
    command = [SOCKET_ACTIVATE, *(f"--listen={address}" for address in listen), *options]
    async with spawn([*command, *argv]) as child:
        await child.wait_for_output(*(f"Listening on {address}" for address in listen))
        yield child


def target_arg(target: TcpTarget) -> str:
    return f"{target.address.host}:{target.address.port}"


def ws_connect(url: str, stream: trio.SocketStream | None = None) -> connect:
    return connect(url, subprotocols=[Subprotocol("binary")], proxy=None, stream=stream)


async def check_relay(ws: ClientConnection, payload: bytes = b"\x00relayed\xff") -> None:
    await ws.send(payload)
    assert await ws.recv() == payload


def loopback_listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


# -- the service manager's notify socket ---------------------------------------------------


@dataclass
class Notification:
    at: float  # trio.current_time() on arrival
    fields: dict[str, str]


@dataclass
class NotifySocket:
    """systemd's end of sd_notify(3): a datagram socket that records every message."""

    path: Path
    sock: trio.socket.SocketType
    received: list[Notification] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def _receive_all(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            lines = data.decode().splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            self.received.append(Notification(trio.current_time(), fields))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, name: str, value: str = "", *, after: int = -1) -> int:
        """Index of the first message after index ``after`` whose ``name`` contains ``value``."""
        while True:
            for index in range(after + 1, len(self.received)):
                fields = self.received[index].fields
                if name in fields and value in fields[name]:
                    return index
            await self._changed.wait()

    def events(self) -> list[str]:
        """The state changes in arrival order, e.g. ``["READY=1", "STOPPING=1"]``."""
        names = ("READY", "RELOADING", "STOPPING")
        return [f"{n}={m.fields[n]}" for m in self.received for n in names if n in m.fields]

    def times(self, predicate: Callable[[dict[str, str]], bool]) -> list[float]:
        return [m.at for m in self.received if predicate(m.fields)]


@pytest.fixture
async def notify_socket(nursery: trio.Nursery, short_tmp: Path) -> NotifySocket:
    path = short_tmp / "notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    notify = NotifySocket(path, sock)
    nursery.start_soon(notify._receive_all)
    return notify


# == socket activation =====================================================================


@needs_socket_activate
async def test_one_unnamed_socket_and_no_listen_address(echo_target: TcpTarget) -> None:
    port = free_port()
    with trio.fail_after(TIMEOUT):
        async with socket_activate([f"127.0.0.1:{port}"], [BRIDGE, target_arg(echo_target)]) as sa:
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:  # this starts the bridge
                await check_relay(ws)
            await sa.wait_for_output(
                f"serving the sockets systemd passed: fd 3 (ws) 127.0.0.1:{port}", " ended: "
            )


@needs_socket_activate
async def test_listen_address_on_the_command_line_is_not_used(echo_target: TcpTarget) -> None:
    port = free_port()
    # 192.0.2.1 (TEST-NET-1) is nobody's address: binding it would fail the start.
    argv = [BRIDGE, "192.0.2.1:6080", target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with socket_activate([f"127.0.0.1:{port}"], argv) as sa:
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_relay(ws)
            await sa.wait_for_output(f"listening on 127.0.0.1:{port}, relaying")


@needs_socket_activate
async def test_several_named_sockets_ipv4_ipv6_unix(
    echo_target: TcpTarget, short_tmp: Path
) -> None:
    v4, v6 = free_port(), free_port()
    unix_path = short_tmp / "ws.sock"
    listen = [f"127.0.0.1:{v4}", f"[::1]:{v6}", str(unix_path)]
    with trio.fail_after(TIMEOUT):
        argv = [BRIDGE, target_arg(echo_target)]
        async with socket_activate(listen, argv, "--fdname=ws:ws:ws") as sa:
            async with ws_connect(f"ws://127.0.0.1:{v4}/") as ws:
                await check_relay(ws, b"over IPv4")
            async with ws_connect(f"ws://[::1]:{v6}/") as ws:
                await check_relay(ws, b"over IPv6")
            async with unix_connect(str(unix_path), "ws://localhost/", proxy=None) as ws:
                await check_relay(ws, b"over a Unix socket")
            await sa.wait_until(lambda text: text.count(" ended: ") == 3)
    assert f"fd 3 (ws) 127.0.0.1:{v4}, fd 4 (ws) [::1]:{v6}, fd 5 (ws) unix:{unix_path}" in (
        sa.stderr
    )


@needs_socket_activate
async def test_wss_named_socket_serves_tls(echo_target: TcpTarget, pki: Pki) -> None:
    """A socket named ``wss`` is served with ``--cert``: a TLS client relays through it."""
    port = free_port()
    with trio.fail_after(TIMEOUT):
        argv = [BRIDGE, "--cert", str(pki.server_file), target_arg(echo_target)]
        async with socket_activate([f"127.0.0.1:{port}"], argv, "--fdname=wss") as sa:
            context = pki.client_context()
            async with connect(
                f"wss://127.0.0.1:{port}/",
                ssl=context,
                subprotocols=[Subprotocol("binary")],
                proxy=None,
            ) as ws:
                await check_relay(ws, b"over TLS")
            await sa.wait_until(lambda text: " ended: " in text)
    assert f"fd 3 (wss) 127.0.0.1:{port}" in sa.stderr


@needs_socket_activate
@pytest.mark.parametrize("inetd", [False, True], ids=["fd3", "inetd"])
async def test_accept_yes_one_process_per_connection(echo_target: TcpTarget, inetd: bool) -> None:
    """Accept=yes: ``--accept`` passes each connection as fd 3 (named "connection" under
    systemd), ``--inetd`` on stdin and stdout. The bridge relays it and exits."""
    port = free_port()
    options = ["--accept", "--inetd"] if inetd else ["--accept"]
    argv = [BRIDGE, target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with socket_activate([f"127.0.0.1:{port}"], argv, *options) as sa:
            url = f"ws://127.0.0.1:{port}/"
            async with ws_connect(url) as first, ws_connect(url) as second:
                await check_relay(first, b"first")
                await check_relay(second, b"second")
            # One process per connection, each gone once its session ended.
            await sa.wait_until(lambda text: text.count("died with code 0") == 2)
    assert sa.stderr.count("Spawned") == 2
    assert sa.stderr.count(" ended: ") == 2
    origin = "inetd" if inetd else "systemd"
    assert f"serving the sockets {origin} passed" in sa.stderr


@needs_socket_activate
async def test_accept_yes_with_wrap_mode_is_a_startup_error() -> None:
    port = free_port()
    argv = [BRIDGE, "--wrap-stdio", "--", "cat"]
    with trio.fail_after(TIMEOUT):
        async with socket_activate([f"127.0.0.1:{port}"], argv, "--accept") as sa:
            client = await trio.open_tcp_stream("127.0.0.1", port)  # spawns one bridge
            await sa.wait_until(lambda text: "died with code 1" in text)
            await client.aclose()
    assert "trio-bridge: wrap mode cannot serve an Accept=yes connection" in sa.stderr


@needs_socket_activate
async def test_accept_yes_sigterm_closes_the_session_with_1001(echo_target: TcpTarget) -> None:
    port = free_port()
    argv = [BRIDGE, target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with (
            socket_activate([f"127.0.0.1:{port}"], argv, "--accept") as sa,
            ws_connect(f"ws://127.0.0.1:{port}/") as ws,
        ):
            await check_relay(ws)
            os.killpg(sa.process.pid, signal.SIGTERM)  # the activator and its child
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")


@needs_socket_activate
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bogus", "fd 3 (FileDescriptorName=bogus): unknown socket role 'bogus'"),
        ("connection", "fd 3 (FileDescriptorName=connection) is a listening socket"),
        ("wss", "a socket named 'wss' needs --cert (and --key)"),
    ],
)
async def test_bad_socket_role_fails_the_start_with_a_clear_error(
    echo_target: TcpTarget, name: str, message: str
) -> None:
    port = free_port()
    argv = [BRIDGE, target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with socket_activate([f"127.0.0.1:{port}"], argv, f"--fdname={name}") as sa:
            client = await trio.open_tcp_stream("127.0.0.1", port)  # starts the bridge
            assert await sa.exit_status() == 1  # the activator execs the bridge: its status
            await client.aclose()
    assert f"trio-bridge: {message}" in sa.stderr


# -- what activation accepts and refuses, on fds handed over as systemd does -------------

# The activation module alone, without the package's __init__ (which imports Trio and
# websockets): it needs neither, and a dozen probes then take a second, not ten.
PROBE = f"""
import sys, types
package = types.ModuleType("trio_bridge")
package.__path__ = [{str(Path(sd.__file__).parent)!r}]
sys.modules["trio_bridge"] = package
from trio_bridge.activation import ActivationError, Role, inherited_sockets
try:
    inherited = inherited_sockets(serve_roles=[Role(r) for r in sys.argv[1:]])
except ActivationError as exc:
    print(f"error: {{exc}}")
else:
    print(inherited if inherited is not None else "none")
"""


async def probe_activation(
    fds: Sequence[int], names: str | None, serve: Sequence[str] = ("ws",)
) -> str:
    """What ``inherited_sockets()`` makes of ``fds`` in a process started like systemd's."""
    env = clean_env(**({"LISTEN_FDNAMES": names} if names is not None else {}))
    result = await trio.run_process(
        activated(fds, [sys.executable, "-c", PROBE, *serve]),
        pass_fds=tuple(fds),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
    )
    return result.stdout.decode().strip()


async def test_activation_roles_and_socket_checks(short_tmp: Path) -> None:
    tcp = loopback_listener()
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(short_tmp / "u.sock"))
    unix.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    conn, peer = socket.socketpair()
    pipe_r, pipe_w = os.pipe()
    port = tcp.getsockname()[1]
    t, u, d, c = tcp.fileno(), unix.fileno(), udp.fileno(), conn.fileno()
    cases: list[tuple[list[int], str | None, tuple[str, ...], str]] = [
        # unnamed (no LISTEN_FDNAMES), named, and systemd's default name "<unit>.socket"
        ([t], None, ("ws",), f"the sockets systemd passed: fd 3 (ws) 127.0.0.1:{port}"),
        ([t, u], "ws:trio-bridge.socket", ("ws",), f"fd 4 (ws) unix:{short_tmp}/u.sock"),
        ([c], "connection", ("ws",), "the sockets systemd passed: fd 3 (connection)"),
        ([c], None, ("ws",), "the sockets systemd passed: fd 3 (connection)"),
        ([t], "metrics", ("ws", "metrics"), "fd 3 (metrics)"),
        # refused, naming the fd
        ([t], "wss", ("ws",), "error: fd 3 (FileDescriptorName=wss): TLS (wss) listeners are "
         "not served by this program"),
        ([t], "metrics", ("ws",), "error: fd 3 (FileDescriptorName=metrics): the metrics"),
        ([t, d], "ws:ws", ("ws",), "error: fd 4 (FileDescriptorName=ws) is not a stream socket"),
        ([t, pipe_r], None, ("ws",), "error: fd 4 is not a socket (a pipe)"),
        ([t, c], "ws:ws", ("ws",), "error: fd 4 (FileDescriptorName=ws) is not a listening "
         "stream socket"),
        ([t, c], None, ("ws",), "error: fd 4 is an accepted connection (Accept=yes), but"),
        ([t], "ws:ws", ("ws",), "error: cannot read the sockets systemd passed"),
    ]
    results: dict[int, str] = {}

    async def probe(index: int) -> None:
        fds, names, serve, _ = cases[index]
        results[index] = await probe_activation(fds, names, serve)

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for index in range(len(cases)):
                    nursery.start_soon(probe, index)
        for index, (fds, names, _, expected) in enumerate(cases):
            assert expected in results[index], (fds, names)
    finally:
        for sock in (tcp, unix, udp, conn, peer):
            sock.close()
        os.close(pipe_r)
        os.close(pipe_w)


async def test_started_by_hand_nothing_is_inherited() -> None:
    """LISTEN_PID names another process and stdin is no socket: bind as before."""
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-c", PROBE, "ws"],
            env=clean_env(LISTEN_FDS="1", LISTEN_PID="1"),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
        )
    assert result.stdout.decode().strip() == "none"


# -- without systemd-python ----------------------------------------------------------------

# The bridge's entry point in an interpreter where "import systemd" fails.
WITHOUT_SYSTEMD_PYTHON = [
    sys.executable,
    "-c",
    "import sys; sys.modules['systemd'] = None\n"
    "from trio_bridge.cli import main; sys.exit(main())",
]


async def test_runs_without_systemd_python_when_started_by_hand(echo_target: TcpTarget) -> None:
    port = free_port()
    argv = [*WITHOUT_SYSTEMD_PYTHON, f"127.0.0.1:{port}", target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with spawn(argv) as bridge:
            await bridge.wait_for_output("listening on")
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_relay(ws)


async def test_socket_activation_without_systemd_python_is_a_clear_error(
    echo_target: TcpTarget,
) -> None:
    with loopback_listener() as listener, trio.fail_after(TIMEOUT):
        fds = [listener.fileno()]
        argv = activated(fds, [*WITHOUT_SYSTEMD_PYTHON, target_arg(echo_target)])
        async with spawn(argv, pass_fds=fds) as bridge:
            assert await bridge.exit_status() == 1
    assert "systemd passed sockets (LISTEN_FDS) but the systemd-python module is not " in (
        bridge.stderr
    )
    assert "pip install 'trio-bridge[systemd]'" in bridge.stderr


async def test_type_notify_without_systemd_python_is_a_clear_error(
    echo_target: TcpTarget, notify_socket: NotifySocket
) -> None:
    argv = [*WITHOUT_SYSTEMD_PYTHON, f"127.0.0.1:{free_port()}", target_arg(echo_target)]
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path))
    with trio.fail_after(TIMEOUT):
        async with spawn(argv, env=env) as bridge:
            assert await bridge.exit_status() == 1
    assert "NOTIFY_SOCKET is set (Type=notify) but the systemd-python module" in bridge.stderr
    assert notify_socket.received == []


async def test_importing_the_bridge_does_not_import_systemd_python() -> None:
    code = "import sys, trio_bridge.cli; print('systemd' in sys.modules)"
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process([sys.executable, "-c", code], capture_stdout=True)
    assert result.stdout.decode().strip() == "False"


# == notify, watchdog, reload ==============================================================


async def test_notify_ready_status_watchdog_reload_stopping_in_order(
    echo_target: TcpTarget, notify_socket: NotifySocket
) -> None:
    """A bridge that binds its own port (started by hand) under a NOTIFY_SOCKET."""
    port = free_port()
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="200000")
    argv = [BRIDGE, "--shutdown-grace", "2", f"127.0.0.1:{port}", target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with spawn(argv, env=env) as bridge:
            ready = await notify_socket.wait_for("READY", "1")
            assert notify_socket.received[ready].fields["STATUS"] == (
                f"0 sessions open on 127.0.0.1:{port}"
            )
            url = f"ws://127.0.0.1:{port}/"
            async with ws_connect(url) as ws:
                await check_relay(ws)
                one = await notify_socket.wait_for("STATUS", "1 session open on", after=ready)
                async with ws_connect(url) as other:
                    await check_relay(other)
                    two = await notify_socket.wait_for("STATUS", "2 sessions open on", after=one)
                # At most one update a second, however fast sessions come and go (the
                # bound leaves room for delays in this process on a busy machine).
                assert notify_socket.received[two].at - notify_socket.received[one].at >= 0.5

                before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                bridge.signal(signal.SIGHUP)
                reloading = await notify_socket.wait_for("RELOADING", "1", after=two)
                monotonic = int(notify_socket.received[reloading].fields["MONOTONIC_USEC"])
                assert before <= monotonic <= before + 5_000_000
                reloaded = await notify_socket.wait_for("READY", "1", after=reloading)
                await check_relay(ws, b"the session survived the reload")

                bridge.signal(signal.SIGTERM)
                stopping = await notify_socket.wait_for("STOPPING", "1", after=reloaded)
                status = notify_socket.received[stopping].fields["STATUS"]
                assert status == "draining: 1 session open"
                # The watchdog keeps pinging while sessions drain.
                await notify_socket.wait_for("WATCHDOG", "1", after=stopping)
                await check_relay(ws, b"still relaying while draining")
            assert await bridge.exit_status() == 0

    assert notify_socket.events() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    # WATCHDOG_USEC=200000: a ping every 100 ms.
    pings = notify_socket.times(lambda fields: "WATCHDOG" in fields)
    gaps = sorted(b - a for a, b in pairwise(pings))
    assert len(gaps) >= 5
    assert 0.05 <= gaps[len(gaps) // 2] <= 0.2
    # Status updates (messages with nothing but STATUS=) come at most once a second.
    updates = notify_socket.times(lambda fields: set(fields) == {"STATUS"})
    assert all(b - a >= 0.5 for a, b in pairwise(updates))


async def test_no_watchdog_pings_when_watchdog_pid_is_another_process(
    echo_target: TcpTarget, notify_socket: NotifySocket
) -> None:
    """A process that merely inherited WATCHDOG_USEC must not ping for its parent."""
    port = free_port()
    env = clean_env(
        NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="100000", WATCHDOG_PID="1"
    )
    argv = [BRIDGE, f"127.0.0.1:{port}", target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with spawn(argv, env=env) as bridge:
            ready = await notify_socket.wait_for("READY", "1")
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_relay(ws)
                # A status update comes after up to a second, in which 10 pings would have.
                await notify_socket.wait_for("STATUS", "1 session open", after=ready)
            bridge.signal(signal.SIGTERM)
            assert await bridge.exit_status() == 0
    assert notify_socket.times(lambda fields: "WATCHDOG" in fields) == []


async def test_reload_runs_every_hook_and_reports_failures_until_a_good_reload() -> None:
    """The SIGHUP path without a process: a failing hook does not stop the others, the
    service still reports READY=1, and the status names the failure until a reload
    succeeds."""
    sent: list[str] = []
    ran: list[str] = []
    broken = True

    async def certificates() -> None:
        ran.append("certificates")
        if broken:
            raise OSError("cert.pem: no such file")

    async def tokens() -> None:
        ran.append("tokens")

    serving = SimpleNamespace(sessions={object()}, listen_addresses=["127.0.0.1:6080"])
    link = sd.ServiceLink(serving, sd.Notifier(sent.append), [certificates, tokens])  # type: ignore[arg-type]
    with trio.fail_after(TIMEOUT):
        await link.reload()
        broken = False
        await link.reload()
    assert ran == ["certificates", "tokens"] * 2
    assert [line.split("\n")[0] for line in sent] == ["RELOADING=1", "READY=1"] * 2
    status = "STATUS=1 session open on 127.0.0.1:6080"
    assert sent[1].endswith(f"{status}; last reload: 1 failure(s), see the log")
    assert sent[3].endswith(status)


# == restart without refusing connections ==================================================


async def test_restart_on_a_held_socket_serves_a_connection_made_in_between(
    echo_target: TcpTarget, notify_socket: NotifySocket
) -> None:
    """The test holds the listening socket, as systemd holds trio-bridge.socket. A client
    that connects while no bridge runs waits in the backlog; the next bridge serves it."""
    listener = loopback_listener()
    port = listener.getsockname()[1]
    fds = [listener.fileno()]
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), LISTEN_FDNAMES="ws")
    argv = activated(fds, [BRIDGE, target_arg(echo_target)])
    url = f"ws://127.0.0.1:{port}/"
    with listener, trio.fail_after(TIMEOUT):
        async with spawn(argv, env=env, pass_fds=fds) as first:
            ready = await notify_socket.wait_for("READY", "1")
            async with ws_connect(url) as ws:
                await check_relay(ws, b"to the first bridge")
            first.signal(signal.SIGTERM)
            assert await first.exit_status() == 0

        # No bridge runs now; the kernel still completes the TCP handshake.
        waiting = await trio.open_tcp_stream("127.0.0.1", port)

        async with spawn(argv, env=env, pass_fds=fds) as second:
            await notify_socket.wait_for("READY", "1", after=ready)
            async with ws_connect(url, stream=waiting) as ws:
                await check_relay(ws, b"connected while no bridge ran")
            second.signal(signal.SIGTERM)
            assert await second.exit_status() == 0
    assert "fd 3 (ws)" in first.stderr and "fd 3 (ws)" in second.stderr
    assert second.stderr.count(" ended: ") == 1


# == journald ==============================================================================


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not _can_unshare_mounts(), reason="needs root and unshare(1) for a private /run"
)

# In a private mount namespace, the test's folder becomes /run/systemd/journal: the
# bridge's libsystemd then sends to the test's socket as it would to journald's.
WITH_PRIVATE_JOURNAL = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && '
    'mount --bind "$0" /run/systemd/journal && exec "$@"',
]


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol: ``NAME=value\\n``, or for a value with newlines
    ``NAME\\n``, its length as 64-bit little endian, the value and ``\\n``."""
    fields: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            data = rest
        else:
            size = int.from_bytes(rest[:8], "little")
            fields[line.decode()] = rest[8 : 8 + size].decode()
            data = rest[8 + size + 1 :]
    return fields


@needs_mount_namespace
@pytest.mark.parametrize("how", ["JOURNAL_STREAM", "--log=journal"])
async def test_journal_gets_structured_session_fields(
    echo_target: TcpTarget, short_tmp: Path, how: str
) -> None:
    journal = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await journal.bind(str(short_tmp / "socket"))
    port = free_port()
    options = [how] if how.startswith("--") else []
    argv = [*WITH_PRIVATE_JOURNAL, str(short_tmp), BRIDGE, *options]
    argv += [f"127.0.0.1:{port}", target_arg(echo_target)]
    records: list[dict[str, str]] = []

    async def next_message() -> str:
        records.append(parse_journal_datagram(await journal.recv(1 << 20)))
        return records[-1].get("MESSAGE", "")

    with trio.fail_after(TIMEOUT):
        async with spawn(argv, journal_stream=how == "JOURNAL_STREAM") as bridge:
            while "listening on" not in await next_message():
                pass
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_relay(ws, b"12345")
            while " ended: " not in await next_message():
                pass
    end = records[-1]
    assert end["SYSLOG_IDENTIFIER"] == "trio-bridge"
    assert end["PRIORITY"] == "6"
    assert end["LOGGER"] == "trio_bridge.server"
    assert (end["BYTES_UP"], end["BYTES_DOWN"], end["CLOSE_CODE"]) == ("5", "5", "1000")
    assert end["TARGET"] == target_arg(echo_target)
    assert end["CLIENT"].startswith("127.0.0.1:")
    assert len(end["SESSION_ID"]) == 8 and end["SESSION_ID"] in end["MESSAGE"]
    for record in records:  # journal field names only, and no "None" for missing values
        assert all(name.upper() == name for name in record), record
        assert "None" not in record.values(), record
    assert "listening on" not in bridge.stderr  # the journal got the log, stderr did not


def test_log_journal_without_journald_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    monkeypatch.setattr(sd, "JOURNAL_SOCKET", str(short_tmp / "no-journald"))
    with pytest.raises(sd.SystemdUnavailable, match="journald is not running"):
        sd.log_handler("journal")


def test_journal_stream_without_systemd_python_gets_priority_prefixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain lines on a journal stream still carry their syslog priority."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert sd.stderr_is_journal()
    handler = sd.log_handler("stderr")
    record = logging.LogRecord("trio_bridge.x", logging.WARNING, __file__, 1, "careful", (), None)
    assert handler.format(record) == "<4>WARNING trio_bridge.x: careful"


# == cold start ============================================================================


@dataclass
class ColdStart:
    wall: float  # seconds from connect to the 101 response
    cpu: float  # CPU seconds the bridge used by then: the wall time of an idle machine


async def cold_start(target: str) -> ColdStart:
    """From a client's connect to the 101 response, when that connection is what starts
    the bridge (systemd-socket-activate execs it on the first connection)."""
    port = free_port()
    async with socket_activate([f"127.0.0.1:{port}"], [BRIDGE, target]) as sa:
        started = time.perf_counter()
        async with ws_connect(f"ws://127.0.0.1:{port}/"):
            wall = time.perf_counter() - started
            cpu = _cpu_seconds(sa.process.pid)
    return ColdStart(wall, cpu)


def _cpu_seconds(pid: int) -> float:
    """Time on a CPU so far, all threads (schedstat: run time, wait time, slices)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9


@needs_socket_activate
async def test_cold_start_under_socket_activation(echo_target: TcpTarget) -> None:
    with trio.fail_after(TIMEOUT):
        elapsed = await cold_start(target_arg(echo_target))
    # The goal is 300 ms (docs/performance.md). The CPU time is what an idle machine
    # would take; a busy test machine gets slack on both.
    assert elapsed.cpu < 1.0, f"the cold start used {elapsed.cpu * 1000:.0f} ms of CPU"
    assert elapsed.wall < 3.0, f"the cold start took {elapsed.wall * 1000:.0f} ms"


def measure_cold_start(runs: int) -> None:
    """``python -m tests.test_systemd [RUNS]``: the figures for docs/performance.md."""

    def summary(what: str, values: list[float]) -> str:
        ms = sorted(value * 1000 for value in values)
        return (
            f"{what}: min {ms[0]:.0f} ms, median {ms[len(ms) // 2]:.0f} ms, "
            f"p90 {ms[int(len(ms) * 0.9)]:.0f} ms, max {ms[-1]:.0f} ms"
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            target: TcpTarget = await nursery.start(TcpTarget(echo).serve)
            results = [await cold_start(target_arg(target)) for _ in range(runs)]
            print(f"cold start, {runs} runs, load average {os.getloadavg()[0]:.1f}")
            print(summary("  connect to 101", [r.wall for r in results]))
            print(summary("  bridge CPU time", [r.cpu for r in results]))
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    measure_cold_start(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
