"""Every way a session ends, with the close code the client sees and what the target sees."""

from __future__ import annotations

import logging
import re
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Opcode
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from trio_bridge import Bridge, Config, Limits, TcpAddress, UnixAddress

from .conftest import (
    ZERO_COPY,
    BridgeStarter,
    LogWaiter,
    RawClient,
    RunningBridge,
    StartTarget,
    TcpTarget,
    check_echo,
    client_frame,
    free_port,
    healthy_session,
    loopback_listener,
)


async def closed_with(ws: ClientConnection) -> Close:
    """Wait for the bridge to close the WebSocket; what it sent, parsed by websockets."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None, "the bridge closed without a close frame"
    return info.value.rcvd


def client_address(ws: ClientConnection) -> str:
    host, port = ws.local_address[:2]
    return f"{host}:{port}"


def rst_on_close(sock: socket.socket | trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- the target ends the session ------------------------------------------------------------


async def echo_once_then_close(stream: trio.SocketStream) -> None:
    """Echo the first chunk; when a second arrives, close (EOF). Data first, close after."""
    await stream.send_all(await stream.receive_some())
    await stream.receive_some()


async def echo_once_then_reset(stream: trio.SocketStream) -> None:
    await stream.send_all(await stream.receive_some())
    await stream.receive_some()
    rst_on_close(stream.socket)  # the fixture's close() now sends RST


@ZERO_COPY
async def test_target_eof_closes_1000(
    start_bridge: BridgeStarter, start_target: StartTarget, zero_copy: bool
) -> None:
    target = await start_target(echo_once_then_close)
    running = await start_bridge(target.address, zero_copy=zero_copy)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            await check_echo(ws, b"one")
            await ws.send(b"two")
            close = await closed_with(ws)
    assert (close.code, close.reason) == (1000, "target closed the connection")


@ZERO_COPY
async def test_target_reset_closes_1011(
    start_bridge: BridgeStarter, start_target: StartTarget, zero_copy: bool
) -> None:
    target = await start_target(echo_once_then_reset)
    running = await start_bridge(target.address, zero_copy=zero_copy)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            await check_echo(ws, b"one")
            await ws.send(b"two")
            close = await closed_with(ws)
    assert close.code == 1011
    assert "reset" in close.reason
    assert str(target.address) in close.reason


async def test_unreachable_tcp_target_opens_then_closes_1011(
    start_bridge: BridgeStarter, bridge_log: LogWaiter
) -> None:
    port = free_port()  # nothing listens there
    running = await start_bridge(TcpAddress("127.0.0.1", port))
    with trio.fail_after(10):
        # The 101 and the close frame arrive together: note the address before connecting.
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        host, local_port = stream.socket.getsockname()[:2]
        address = f"{host}:{local_port}"
        async with connect(running.url, stream=stream, subprotocols=[Subprotocol("binary")]) as ws:
            assert ws.subprotocol == "binary"  # the handshake succeeded
            close = await closed_with(ws)
    reason = f"target 127.0.0.1:{port} refused the connection"
    assert (close.code, close.reason) == (1011, reason)
    with trio.fail_after(5):
        await bridge_log.wait_for(address, reason)


async def test_missing_unix_target_opens_then_closes_1011(
    start_bridge: BridgeStarter, tmp_path: Path
) -> None:
    path = tmp_path / "nobody-here.sock"
    running = await start_bridge(UnixAddress(str(path)))
    with trio.fail_after(10):
        async with connect(running.url) as ws:
            close = await closed_with(ws)
    assert close.code == 1011
    assert close.reason == f"target unix:{path} does not exist"


# -- the client ends the session ------------------------------------------------------------


async def test_client_close_frame_gives_target_eof_within_1s(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(echo_target.address)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            await check_echo(ws, b"hello")
            await ws.aclose(1000, "bye")
            with trio.fail_after(1):
                await echo_target.closed_event.wait()
        assert ws.close_code == 1000  # the bridge echoed the close frame
        assert ws.close_reason == "bye"


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_vanishing_closes_target_within_1s(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter, how: str
) -> None:
    running = await start_bridge(echo_target.address)
    with trio.fail_after(10):
        client = await RawClient.open(running.port)
        await client.handshake()
        await client.send(client_frame(Opcode.BINARY, b"ping"))
        frame = await client.read_frame()
        assert frame.data == b"ping"
        if how == "rst":
            rst_on_close(client.stream.socket)
        await client.aclose()  # no close frame
        with trio.fail_after(1):
            await echo_target.closed_event.wait()
        record = await bridge_log.wait_for("ended", f"client={client.local_address}")
    assert "close=1006" in record.getMessage()


# -- time limits -----------------------------------------------------------------------------


async def test_idle_session_closed_1001(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(echo_target.address, idle_timeout=0.5)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            await check_echo(ws, b"hello")
            idle_since = trio.current_time()
            close = await closed_with(ws)
            waited = trio.current_time() - idle_since
    assert close.code == 1001
    assert "idle" in close.reason
    assert 0.45 <= waited <= 1.5


async def test_traffic_keeps_idle_session_open(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(echo_target.address, idle_timeout=0.5)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            started = trio.current_time()
            for i in range(12):  # 1.2 s of traffic, more than twice the idle timeout
                await check_echo(ws, b"tick %d" % i)
                await trio.sleep(0.1)  # the client's pace, not synchronisation
            assert trio.current_time() - started >= 1.0
            await check_echo(ws, b"still open")


async def test_session_time_limit_closes_1001_despite_traffic(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(echo_target.address, session_timeout=0.5)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            started = trio.current_time()
            with pytest.raises(ConnectionClosed) as info:
                for i in range(1_000_000):  # busy session: never idle
                    await check_echo(ws, b"busy %d" % i)
            elapsed = trio.current_time() - started
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1001
    assert "time limit" in info.value.rcvd.reason
    assert 0.45 <= elapsed <= 1.5


async def test_heartbeat_kept_alive_by_a_client_that_answers_pings(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, heartbeat=0.2)
    bridge_log.caplog.set_level(logging.DEBUG, logger="tests.wsclient")
    client_log = logging.getLogger("tests.wsclient")
    client_log.addHandler(bridge_log)  # wakes wait_for on the client's frame log
    try:
        with trio.fail_after(10):
            async with connect(
                running.url,
                subprotocols=[Subprotocol("binary")],
                ping_interval=None,
                logger=client_log,
            ) as ws:
                await check_echo(ws, b"hello")
                # four pings received and answered: more than three heartbeat intervals
                await bridge_log.wait_for("< PING", logger="tests.wsclient", count=4)
                await check_echo(ws, b"still open after 4 heartbeats")
    finally:
        client_log.removeHandler(bridge_log)


async def test_heartbeat_closes_1011_when_pongs_never_come(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(echo_target.address, heartbeat=0.2)
    with trio.fail_after(10):
        async with healthy_session(running.url):  # answers pings: must outlive the silent one
            client = await RawClient.open(running.port)
            await client.handshake()
            started = trio.current_time()
            pings = 0
            while True:  # read, never answer
                frame = await client.read_frame()
                if frame.opcode is Opcode.PING:
                    pings += 1
                elif frame.opcode is Opcode.CLOSE:
                    close = Close.parse(frame.data)
                    break
            elapsed = trio.current_time() - started
            assert await client.read_to_eof() == b""
            await client.aclose()
    assert pings >= 1
    assert close.code == 1011
    assert "pong" in close.reason
    # The first ping comes after 50-100% of the interval (jitter), the close one
    # interval after it: 0.3-0.4 s after the bridge's handshake, which ends just
    # before the client's clock starts.
    assert 0.25 <= elapsed <= 1.5


# -- limits and shutdown -----------------------------------------------------------------------


async def test_third_connection_over_max_connections_gets_503(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, max_connections=2)
    with trio.fail_after(10):
        async with (
            connect(running.url, subprotocols=[Subprotocol("binary")]) as first,
            connect(running.url, subprotocols=[Subprotocol("binary")]) as second,
        ):
            with pytest.raises(InvalidStatus) as info:
                async with connect(running.url, subprotocols=[Subprotocol("binary")]):
                    pass
            assert info.value.response.status_code == 503
            await bridge_log.wait_for("503", "limit")
            await check_echo(first, b"first still relays")
            await check_echo(second, b"second still relays")


async def _start_own_bridge(
    nursery: trio.Nursery, target: TcpTarget, **limits: Any
) -> RunningBridge:
    listener = loopback_listener()
    config = Config(target=target.address, limits=Limits(**limits))
    bridge: Bridge = await nursery.start(Bridge(config).serve, [listener])
    return RunningBridge(bridge, listener.getsockname()[1])


async def test_shutdown_closes_sessions_1001_after_grace_and_serve_returns(
    echo_target: TcpTarget,
) -> None:
    grace = 1.0
    closes: list[tuple[Close, float]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            served = trio.Event()

            async def serve_then_mark(task_status: trio.TaskStatus[RunningBridge]) -> None:
                async with trio.open_nursery() as inner:
                    running = await _start_own_bridge(inner, echo_target, shutdown_grace=grace)
                    task_status.started(running)
                served.set()

            running = await outer.start(serve_then_mark)

            async def session(task_status: trio.TaskStatus[None]) -> None:
                async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
                    await check_echo(ws, b"open")
                    task_status.started()
                    close = await closed_with(ws)
                    closes.append((close, trio.current_time()))

            for _ in range(2):
                await outer.start(session)
            asked = trio.current_time()
            running.bridge.request_shutdown()
            await served.wait()
            returned = trio.current_time() - asked
    assert len(closes) == 2
    for close, when in closes:
        assert (close.code, close.reason) == (1001, "server shutting down")
        assert when - asked >= grace * 0.95
    assert returned <= grace + 1.5


async def test_shutdown_refuses_new_connections_at_once(
    echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running = await _start_own_bridge(nursery, echo_target, shutdown_grace=3)
            async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
                await check_echo(ws, b"open")
                running.bridge.request_shutdown()
                await bridge_log.wait_for("shutting down")
                # The session drains for shutdown_grace; a newcomer must not wait that long.
                with trio.move_on_after(1) as hung:
                    with pytest.raises((OSError, InvalidStatus, ConnectionClosed)):
                        async with connect(running.url, open_timeout=None):
                            pass
                assert not hung.cancelled_caught, "a new connection hung during shutdown"
                await check_echo(ws, b"still relaying during the grace period")
            nursery.cancel_scope.cancel()


async def test_shutdown_returns_as_soon_as_sessions_end(echo_target: TcpTarget) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running = await _start_own_bridge(nursery, echo_target, shutdown_grace=30)
            async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
                await check_echo(ws, b"open")
                running.bridge.request_shutdown()
            asked = trio.current_time()
        # serve() returned, so the nursery exited, well before the 30 s grace
        assert trio.current_time() - asked < 2


# -- the end-of-session log line -----------------------------------------------------------------


async def test_session_end_log_line_has_client_target_bytes_duration_code(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address)
    payloads = [b"a" * 1000, b"b" * 70_000, b"c"]
    total = sum(map(len, payloads))
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            address = client_address(ws)
            for payload in payloads:
                await ws.send(payload)
            got = 0
            while got < total:
                got += len(await ws.recv())
            await ws.aclose(1000, "done here")
        record = await bridge_log.wait_for(
            "ended", f"client={address}", logger="trio_bridge.server"
        )
    message = record.getMessage()
    assert f"target={echo_target.address}" in message
    assert f"up={total}B" in message
    assert f"down={total}B" in message
    assert re.search(r"duration=\d+\.\d+s", message)
    assert "close=1000" in message
    assert "done here" in message
    assert record.levelname == "INFO"


async def test_the_ping_timer_keeps_no_ended_session_alive() -> None:
    """The bridge's one ping timer holds sessions weakly: one that ended is freed at
    once, not kept (with its buffers) until its next ping would have been due."""
    import gc
    import weakref

    from trio_bridge.heartbeat import Heartbeats

    class Pinged:
        def __init__(self) -> None:
            self.pinged = trio.Event()

        def ping_due(self) -> None:
            self.pinged.set()

    heartbeats = Heartbeats()
    kept, ended = Pinged(), Pinged()
    gone = weakref.ref(ended)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats.run)
            now = trio.current_time()
            heartbeats.schedule(ended, now + 0.05)
            heartbeats.schedule(kept, now + 0.1)
            del ended
            gc.collect()
            assert gone() is None
            await kept.pinged.wait()
            assert trio.current_time() >= now + 0.1
            nursery.cancel_scope.cancel()
