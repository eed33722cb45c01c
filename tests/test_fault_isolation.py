"""One connection's failure is never the process's: the fault boundary and the requests
that used to end the whole bridge (issue: no request can take the bridge down).

Each test keeps a session open across the attack (``healthy_session``) where the
bridge has a working target, or runs the bridge as a real subprocess and checks it is
still serving afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Request, Response
from websockets.trio.client import connect, unix_connect

from trio_bridge import Bridge, Config, Limits, TcpAddress, UnixAddress
from trio_bridge.cli import build_parser, config_from_args
from trio_bridge.config import Address
from trio_bridge.limits import HandshakeBudget
from trio_bridge.logs import EscapeControlCharacters, RateLimitedLog, escape
from trio_bridge.observe import SessionInfo, SessionObserver

from .conftest import (
    BridgeStarter,
    LogWaiter,
    RunningBridge,
    TcpTarget,
    check_echo,
    free_port,
    healthy_session,
    loopback_listener,
    ws_request,
)
from .security_support import Pki, open_from, parse_response, pki, read_all

__all__ = ["pki"]  # a fixture, used by name
from .test_cli import EXECUTABLE, BridgeProcess, cli


async def start(nursery: trio.Nursery, bridge: Bridge) -> RunningBridge:
    listener = loopback_listener()
    port = listener.getsockname()[1]
    await nursery.start(bridge.serve, [listener])
    return RunningBridge(bridge, port)


def incident_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "incident" in r.getMessage() and r.exc_info]


# -- the fault boundary ---------------------------------------------------------------


class WrongTypeResolver:
    """An operator's resolver with a bug: ``/bad`` answers a string, not an address."""

    def __init__(self, good: Address) -> None:
        self.good = good

    async def resolve(self, request: Request, client: str) -> Address:
        if request.path == "/bad":
            return "127.0.0.1:5900"  # type: ignore[return-value]
        return self.good


class RaisingResponder:
    """An operator's HTTP responder with a bug."""

    async def respond(self, request: Request, client: str) -> Response | None:
        raise RuntimeError("bug in a plugin")


async def test_a_resolver_answering_the_wrong_type_costs_its_client_a_500_only(
    nursery: trio.Nursery, echo_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = Bridge(Config(target=None), resolver=WrongTypeResolver(echo_target.address))
    running = await start(nursery, bridge)
    with trio.fail_after(10):
        async with healthy_session(running.url):
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{running.url}bad"):
                    pass
            response = info.value.response
            assert response.status_code == 500
            assert b"incident" in response.body
    [record] = incident_records(caplog)
    assert record.levelno == logging.ERROR
    assert bridge.connections == 0


async def test_an_http_responder_that_raises_costs_its_client_a_500_only(
    nursery: trio.Nursery, echo_target: TcpTarget, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = Bridge(Config(target=echo_target.address), http=RaisingResponder())
    running = await start(nursery, bridge)
    with trio.fail_after(10):
        async with healthy_session(running.url):
            stream = await open_from(running.port)
            async with stream:
                await stream.send_all(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
                data, _ = await read_all(stream)
            assert parse_response(data).status_code == 500
    assert len(incident_records(caplog)) == 1


class RecorderThatCannotOpen:
    """An observer factory failing as a recorder does on a broken disk."""

    def open(self, info: SessionInfo) -> SessionObserver | None:
        raise OSError(errno.EIO, "Input/output error", "/var/lib/trio-bridge/x.tbrec")


async def test_a_recording_that_cannot_start_costs_the_recording_only(
    nursery: trio.Nursery, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    bridge = Bridge(Config(target=echo_target.address), observers=RecorderThatCannotOpen())
    running = await start(nursery, bridge)
    with trio.fail_after(10):
        async with connect(running.url) as ws:
            await check_echo(ws, b"relayed unrecorded")
        record = await bridge_log.wait_for("the recording could not start")
    assert record.exc_info is not None


async def test_an_over_long_close_reason_is_clipped_not_fatal(
    start_bridge: BridgeStarter, tmp_path: Path
) -> None:
    """A ~100-character Unix path whose server is gone makes a reason over 123 bytes."""
    missing = tmp_path / ("x" * 90) / "gone.sock"
    missing.parent.mkdir()
    running = await start_bridge(UnixAddress(str(missing)))
    with trio.fail_after(10):
        for _ in range(2):  # the bridge is still there for the second one
            async with connect(running.url) as ws:
                with pytest.raises(ConnectionClosedError) as info:
                    await ws.recv()
            close = info.value.rcvd
            assert close is not None and close.code == 1011
            assert len(close.reason.encode()) <= 123
            assert close.reason.startswith("target unix:") and close.reason.endswith("...")


async def test_an_invalid_idna_host_is_a_clear_1011(
    start_bridge: BridgeStarter, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(TcpAddress("ä" * 70 + ".example", 5900))
    with trio.fail_after(10):
        for _ in range(2):
            async with connect(running.url) as ws:
                with pytest.raises(ConnectionClosedError) as info:
                    await ws.recv()
            close = info.value.rcvd
            assert close is not None and close.code == 1011
            assert close.reason.startswith("target ää")
        await bridge_log.wait_for("could not be resolved (not a valid host name)")


# -- TLS: a required client certificate cannot be bypassed ------------------------------


@pytest.mark.parametrize("request_bytes", [ws_request(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
async def test_plain_connections_are_refused_when_a_client_certificate_is_required(
    start_bridge: BridgeStarter,
    echo_target: TcpTarget,
    pki: Pki,
    bridge_log: LogWaiter,
    request_bytes: bytes,
) -> None:
    settings = pki.settings(verify_client=True, cafile=str(pki.ca_file))
    running = await start_bridge(echo_target.address, tls=settings)
    with trio.fail_after(10):
        stream = await open_from(running.port)
        async with stream:
            await stream.send_all(request_bytes)
            data, _ = await read_all(stream)
        response = parse_response(data)
        assert response.status_code == 400
        assert b"client certificate" in response.body
        await bridge_log.wait_for("refused with 400", "client certificate is required")
    assert echo_target.accepted == 0


# -- refusals are cheap, slow handshakes cannot lock others out -------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_refused_connections_do_not_pile_up_file_descriptors(
    echo_target: TcpTarget,
) -> None:
    port = free_port()
    args = [f"127.0.0.1:{port}", str(echo_target.address), "--limit-exempt", "none"]
    args += ["--max-connections-per-address", "4", "--connection-rate", "0"]
    held: list[trio.SocketStream] = []
    with trio.fail_after(30):
        async with cli(*args) as bridge:
            await bridge.wait_for_line("listening on")
            pid = bridge.process.pid
            baseline = peak = open_fds(pid)
            try:
                for _ in range(300):  # the client keeps every socket open and silent
                    held.append(await open_from(port, "127.0.0.2"))
                    peak = max(peak, open_fds(pid))
                # Once the last one is answered, the bridge has accepted them all.
                answer = await held[-1].receive_some(100)
                assert answer.startswith(b"HTTP/1.1 429 ")
                peak = max(peak, open_fds(pid))
                # 4 admitted + at most 64 refusals lingering + those accepted in the
                # current burst and not yet answered (the accept loop yields every 16,
                # so at most two bursts); before: one fd each for ~1 s, ~300.
                assert peak - baseline <= 4 + 64 + 2 * 16 + 4, (baseline, peak)
            finally:
                for stream in held:
                    await stream.aclose()
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_echo(ws, b"still serving")


async def test_slow_handshakes_cannot_fill_the_connection_table(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(
        echo_target.address,
        max_connections=40,
        max_handshakes=10,
        limit_exempt=(),
        connection_rate=None,
    )
    idle: list[trio.SocketStream] = []
    with trio.fail_after(20):
        async with healthy_session(running.url):
            try:
                for n in range(60):  # more than --max-connections, from 5 addresses
                    idle.append(await open_from(running.port, f"127.0.0.{2 + n % 5}"))
                async with connect(running.url) as ws:  # a newcomer from elsewhere
                    await check_echo(ws, b"got in")
            finally:
                for stream in idle:
                    await stream.aclose()
        await bridge_log.wait_for("closed to make room for a new connection")
    evictions = [r for r in bridge_log.caplog.records if "to make room" in r.getMessage()]
    assert len(evictions) == 1  # the rest are counted, not logged one by one


async def test_handshake_budget_shortens_the_timeout_under_pressure() -> None:
    budget = HandshakeBudget(limit=4, timeout=10.0)
    with budget.enter() as first, budget.enter() as second:
        assert first.timeout == second.timeout == 10.0
        with budget.enter() as third:
            assert third.timeout == 2.5
            budget.leave(first)
            assert len(budget) == 2


# -- per-uid limits on Unix listeners -----------------------------------------------------


@pytest.mark.parametrize("exempt", [(), ("uid:0",)])
async def test_unix_listener_clients_are_limited_per_uid(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, exempt: tuple[str, ...]
) -> None:
    path = str(tmp_path / "ws.sock")
    limits = Limits(max_connections_per_address=2, connection_rate=None)
    config = Config(
        target=echo_target.address, listen=UnixAddress(path), limits=limits, limit_exempt=exempt
    )
    await nursery.start(Bridge(config).serve)
    with trio.fail_after(10):
        async with unix_connect(path) as first, unix_connect(path) as second:
            await check_echo(first, b"1")
            await check_echo(second, b"2")
            if exempt:
                async with unix_connect(path) as third:
                    await check_echo(third, b"3")
            else:
                with pytest.raises(InvalidStatus) as info:
                    async with unix_connect(path):
                        pass
                assert info.value.response.status_code == 429


# -- logs: no forged lines, no floods -----------------------------------------------------


def test_escape_makes_control_characters_visible() -> None:
    assert escape("a\nb\rc\x1b[31md\x00\x7f\x85\u2028") == (
        "a\\x0ab\\x0dc\\x1b[31md\\x00\\x7f\\x85\\u2028"
    )
    assert escape("ünïcödé and tabs?") == "ünïcödé and tabs?"
    record = logging.LogRecord("x", logging.INFO, "f", 1, "close %s", ("a\nFORGED",), None)
    EscapeControlCharacters().filter(record)
    assert record.getMessage() == "close a\\x0aFORGED"


async def test_a_close_reason_cannot_forge_a_log_line(echo_target: TcpTarget) -> None:
    port = free_port()
    forged = "bye\n<0>FORGED ERROR trio_bridge: pwned\x1b[31m"
    with trio.fail_after(15):
        async with cli("-v", f"127.0.0.1:{port}", str(echo_target.address)) as bridge:
            await bridge.wait_for_line("listening on")
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_echo(ws, b"hello")
                await ws.aclose(1000, forged)
            await bridge.wait_for_line(r"session \w+ ended")
            bridge.process.terminate()
            _, lines = await bridge.finish()
    assert not any(line.startswith(("FORGED", "<0>")) for line in lines), lines
    assert any("bye\\x0a<0>FORGED" in line and "\\x1b[31m" in line for line in lines), lines
    assert not any("\x1b" in line for line in lines)


def test_rate_limited_log_counts_what_it_does_not_print(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("trio_bridge.test"),
        lambda key, n, s: f"{n} more for {key} in {s:g} s",
        interval=60,
        clock=lambda: now[0],
    )
    caplog.set_level(logging.INFO, logger="trio_bridge")
    for second in range(100):
        now[0] = float(second)
        limited.log("target-a", "first for %s", "target-a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["first for target-a", "59 more for target-a in 60 s", "first for target-a"]
    limited.flush()
    assert caplog.records[-1].getMessage() == "39 more for target-a in 60 s"


async def test_a_target_that_is_down_is_logged_once_per_minute_not_per_session(
    start_bridge: BridgeStarter, bridge_log: LogWaiter
) -> None:
    down = TcpAddress("127.0.0.1", free_port())
    running = await start_bridge(down)
    with trio.fail_after(20):
        for _ in range(30):
            async with connect(running.url) as ws:
                with pytest.raises(ConnectionClosedError):
                    await ws.recv()
    warnings = [
        r
        for r in bridge_log.caplog.records
        if r.levelno >= logging.WARNING and "refused the connection" in r.getMessage()
    ]
    assert len(warnings) == 1


# -- running out of file descriptors --------------------------------------------------------


async def test_running_out_of_file_descriptors_is_survived(echo_target: TcpTarget) -> None:
    """EMFILE in the WebSocket and the metrics accept loops: logged, retried, survived."""
    port, metrics_port = free_port(), free_port()
    held: list[trio.SocketStream] = []
    command = ["prlimit", "--nofile=48:48", str(EXECUTABLE), f"127.0.0.1:{port}"]
    command += [str(echo_target.address), "--metrics", f"127.0.0.1:{metrics_port}"]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    bridge = BridgeProcess(process)
    try:
        with trio.fail_after(30):
            await bridge.wait_for_line("listening on")
            for _ in range(60):  # silent clients: each costs the bridge one fd
                held.append(await open_from(port))
            await bridge.wait_for_line("cannot accept connections: Too many open files")
            held.append(await open_from(metrics_port))  # a scrape while out of fds
            await bridge.wait_for_line("metrics: cannot accept scrapes: Too many open files")
            for stream in held:
                await stream.aclose()
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await check_echo(ws, b"after EMFILE")
            stream = await open_from(metrics_port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                data, _ = await read_all(stream)
            assert parse_response(data).status_code == 200
            assert process.returncode is None
            process.terminate()
            status, lines = await bridge.finish()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    assert status == 0, lines
    for what in ("cannot accept connections", "cannot accept scrapes"):
        exhausted = [line for line in lines if what in line]
        assert len(exhausted) == 1, exhausted  # rate-limited: not one line per retry


# -- production defaults ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "heartbeat", "idle"),
    [
        ([], 30.0, None),
        (["--heartbeat", "0"], None, None),
        (["--heartbeat", "5", "--idle-timeout", "600"], 5.0, 600.0),
        (["--idle-timeout", "0"], 30.0, None),
    ],
)
def test_heartbeat_is_on_by_default_and_0_turns_a_timer_off(
    args: list[str], heartbeat: float | None, idle: float | None
) -> None:
    parsed = build_parser().parse_args([*args, "6080", "127.0.0.1:5900"])
    limits = config_from_args(parsed).bridge.limits
    assert (limits.heartbeat, limits.idle_timeout) == (heartbeat, idle)
    assert limits.max_handshakes == 256
