"""A session's faults stay that session's: inflation bombs, stalled readers, broken
observers, internal errors and over-long close reasons.

Each test drives real sockets on 127.0.0.1; the only test doubles are the ones the
bridge's interfaces invite (an observer, a target transport), built on real sockets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tracemalloc
from collections import Counter

import pytest
import trio
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ProtocolError
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Close
from websockets.http11 import Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.trio.client import connect
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from trio_bridge import Bridge, Config
from trio_bridge import server as server_module
from trio_bridge.config import Address
from trio_bridge.observe import Direction, ObservedFrame, Opcode, SessionInfo
from trio_bridge.session import fit_reason
from trio_bridge.targets import TargetUnavailable
from trio_bridge.targets import connect as real_connect
from trio_bridge.tls import TargetTls
from trio_bridge.transport import SocketTransport, StreamTransport

from .conftest import (
    ZERO_COPY,
    BridgeStarter,
    LogWaiter,
    RawClient,
    RunningBridge,
    StartTarget,
    TcpTarget,
    check_echo,
    healthy_session,
    loopback_listener,
)
from .recording_support import receive_bytes

MIB = 1 << 20


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("trio_bridge") and r.levelno >= logging.ERROR
    ]


# -- 1. compression: what a session holds after inflating is bounded -------------------------


class SlowSink:
    """A target that reads slowly and hashes what it gets, so the test can check every byte."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.digest = hashlib.sha256()
        self.done = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        while chunk := await stream.receive_some(64 * 1024):
            self.digest.update(chunk)
            self.received += len(chunk)
            if self.received >= self.expected:
                self.done.set()
            await trio.sleep(0.001)  # a slow reader's pace, not synchronisation


async def open_deflate_client(port: int) -> tuple[trio.SocketStream, ClientProtocol]:
    """A client that negotiated permessage-deflate, driven with websockets' sans-I/O protocol."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    protocol = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{port}/"),
        extensions=[ClientPerMessageDeflateFactory()],
        subprotocols=[Subprotocol("binary")],
    )
    protocol.send_request(protocol.connect())
    for chunk in protocol.data_to_send():
        await stream.send_all(chunk)
    while not (events := protocol.events_received()):
        protocol.receive_data(await stream.receive_some())
    assert isinstance(events[0], Response) and events[0].status_code == 101
    assert protocol.state is OPEN and protocol.extensions, "deflate was not negotiated"
    return stream, protocol


async def test_compressed_burst_is_inflated_within_a_bounded_budget(
    start_bridge: BridgeStarter, start_target: StartTarget
) -> None:
    """64 messages of 1 MiB, ~1 KiB each on the wire, sent in one burst to a slow target.

    Before the fix the bridge inflated the whole burst (one client read) before writing
    any of it: a peak of ~64 MiB here, ~250 MiB with a full 256 KiB read.
    """
    count = 64
    sink = SlowSink(count * MIB)
    target = await start_target(sink)
    running = await start_bridge(target.address, compression=True)
    tracemalloc.start()
    try:
        with trio.fail_after(60):
            stream, protocol = await open_deflate_client(running.port)
            expected = hashlib.sha256()
            for i in range(count):
                message = i.to_bytes(4, "big") + bytes(MIB - 4)  # deflates ~1000:1
                expected.update(message)
                protocol.send_binary(message)
            burst = b"".join(protocol.data_to_send())
            del message
            assert len(burst) < count * 2048  # the whole burst fits one bridge read
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await stream.send_all(burst)
            await sink.done.wait()
            peak = tracemalloc.get_traced_memory()[1] - baseline
            await stream.aclose()
    finally:
        tracemalloc.stop()
    print(f"bridge + target peak while relaying the burst: {peak / MIB:.1f} MiB")
    assert sink.received == count * MIB
    assert sink.digest.digest() == expected.digest()
    assert peak < 12 * MIB


async def test_compressed_messages_parsed_in_slices_arrive_whole(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    """Frames cut across slices, fragmented and text messages, pings between them."""
    running = await start_bridge(echo_target.address, compression=True)
    incompressible = os.urandom(512 * 1024)  # one frame spanning ~128 slices
    with trio.fail_after(20):
        async with connect(running.url, subprotocols=[Subprotocol("binary")], max_size=None) as ws:
            assert ws.protocol.extensions, "deflate was not negotiated"
            await ws.send([b"frag-1 ", b"frag-2 " * 3000, b"frag-3"])
            await ws.ping()
            await ws.send("text é€😀 " * 2000)
            await ws.send(incompressible)
            expected = (
                b"frag-1 " + b"frag-2 " * 3000 + b"frag-3"
                + ("text é€😀 " * 2000).encode()
                + incompressible
            )  # fmt: skip
            assert await receive_bytes(ws, len(expected)) == expected


# -- 2. heartbeat: a client that stopped reading is a dead peer ------------------------------


async def flood(stream: trio.SocketStream) -> None:
    chunk = bytes(64 * 1024)
    while True:
        await stream.send_all(chunk)


@ZERO_COPY
async def test_heartbeat_ends_session_of_a_client_that_stopped_reading(
    start_bridge: BridgeStarter, start_target: StartTarget, bridge_log: LogWaiter, zero_copy: bool
) -> None:
    target = await start_target(flood)
    running = await start_bridge(target.address, heartbeat=1.0, zero_copy=zero_copy)
    with trio.fail_after(10):
        client = await RawClient.open(running.port)
        await client.handshake()
        started = trio.current_time()
        # The client reads nothing more: the relay blocks writing to it, with data queued.
        record = await bridge_log.wait_for(
            "ended", f"client={client.local_address}", logger="trio_bridge.server"
        )
        elapsed = trio.current_time() - started
        await target.closed_event.wait()  # the bridge closed the target socket
        await client.read_to_eof()  # ... and the client's: what was queued, then EOF
        await client.aclose()
    assert "keepalive: no pong within 1 s" in record.getMessage()
    assert 1.5 <= elapsed < 3.0, elapsed  # ping at 1 s, not written by 2 s: closed


# -- 3. a failing observer ends its recording, not the session --------------------------------


class FailingObserver:
    """An observer (the operator-provided interface) that raises on its ``nth`` call of
    ``hook``, counting every call it gets."""

    def __init__(self, hook: str, nth: int) -> None:
        self.hook = hook
        self.nth = nth
        self.calls: Counter[str] = Counter()
        self.frames: list[tuple[Direction, ObservedFrame]] = []
        self.ended: list[int | None] = []

    def _called(self, hook: str) -> None:
        self.calls[hook] += 1
        if hook == self.hook and self.calls[hook] == self.nth:
            raise RuntimeError(f"observer bug in {hook} (test)")

    def on_frame(self, direction: Direction, frame: ObservedFrame) -> None:
        self.frames.append((direction, frame))
        self._called("on_frame")

    def on_end(self, close_code: int | None, close_reason: str, closed_by: str) -> None:
        self.ended.append(close_code)


class FailingObservers:
    def __init__(self, hook: str, nth: int) -> None:
        self.hook = hook
        self.nth = nth
        self.opened: list[FailingObserver] = []

    def open(self, info: SessionInfo) -> FailingObserver:
        observer = FailingObserver(self.hook, self.nth)
        self.opened.append(observer)
        return observer


async def start_observed_bridge(
    nursery: trio.Nursery, target: Address, observers: FailingObservers
) -> RunningBridge:
    listener = loopback_listener()
    bridge: Bridge = await nursery.start(
        Bridge(Config(target=target), observers=observers).serve, [listener]
    )
    return RunningBridge(bridge, listener.getsockname()[1])


async def test_observer_failing_in_on_frame_is_detached_and_the_session_relays_on(
    nursery: trio.Nursery,
    echo_target: TcpTarget,
    bridge_log: LogWaiter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observers = FailingObservers("on_frame", 3)
    running = await start_observed_bridge(nursery, echo_target.address, observers)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            for i in range(10):  # two frames each: up, then down
                await check_echo(ws, b"message %d" % i)
        await bridge_log.wait_for("ended", "close=1000", logger="trio_bridge.server")
    (observer,) = observers.opened
    assert observer.calls["on_frame"] == 3  # detached at its failure
    assert observer.frames[:2] == [
        (Direction.UP, ObservedFrame(Opcode.BINARY, b"message 0")),
        (Direction.DOWN, ObservedFrame(Opcode.BINARY, b"message 0")),
    ]
    # The project's types, not websockets' (whose Opcode compares equal as an IntEnum).
    assert all(type(f.opcode) is Opcode and type(f.payload) is bytes for _, f in observer.frames)
    assert observer.ended == [1000]  # still told of the end, to finish its recording
    (error,) = errors(caplog)
    assert "observer" in error.getMessage() and "on_frame" in error.getMessage()
    assert error.exc_info is not None


# -- 4. close reasons fit a control frame -------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    ["", "short", "x" * 123, "x" * 124, "é" * 62, "é" * 100, "a" + "€" * 60, "😀" * 40],
)
def test_fit_reason_clips_to_123_bytes_on_a_character_boundary(reason: str) -> None:
    fitted = fit_reason(reason)
    encoded = fitted.encode()
    assert len(encoded) <= 123
    if len(reason.encode()) <= 123:
        assert fitted == reason
    else:
        assert fitted.endswith("...")
        assert reason.startswith(fitted[:-3])
        assert len(encoded) > 123 - 3 - 4  # clipped at the last whole character, no sooner
    protocol = ServerProtocol()
    protocol.state = OPEN
    protocol.send_close(1011, fitted)  # websockets accepts it as a control frame
    (data,) = protocol.data_to_send()
    assert Close.parse(data[2:]).reason == fitted


def test_unclipped_long_reason_is_what_websockets_refuses() -> None:
    """Why fit_reason exists: send_close raises on a reason over 123 bytes."""
    protocol = ServerProtocol()
    protocol.state = OPEN
    with pytest.raises(ProtocolError):
        protocol.send_close(1011, "x" * 124)


# -- 5. an internal error ends its session only, with 1011 ----------------------------------------


class FaultyTarget(SocketTransport):
    """A real socket transport with a bug: reading ``boom`` from the target raises."""

    async def recv(self, max_bytes: int) -> bytes:
        data = await super().recv(max_bytes)
        if b"boom" in data:
            raise RuntimeError("injected bug in a target transport (test)")
        return data


@ZERO_COPY
async def test_internal_error_closes_that_session_1011_and_others_relay_on(
    start_bridge: BridgeStarter,
    echo_target: TcpTarget,
    bridge_log: LogWaiter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    zero_copy: bool,
) -> None:
    async def connect_faulty(
        address: Address, timeout: float, *, tls: TargetTls | None = None
    ) -> SocketTransport | StreamTransport:
        transport = await real_connect(address, timeout, tls=tls)
        if transport.raw is None:
            raise TargetUnavailable("test: expected a plain socket")
        return FaultyTarget(transport.raw)

    monkeypatch.setattr(server_module, "connect", connect_faulty)
    running = await start_bridge(echo_target.address, zero_copy=zero_copy)
    with trio.fail_after(10):
        async with healthy_session(running.url):
            async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
                await check_echo(ws, b"fine so far")
                await ws.send(b"boom")
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await ws.recv()
            assert info.value.rcvd is not None, "closed without a close frame"
            assert info.value.rcvd.code == 1011
            assert info.value.rcvd.reason == "internal error in the bridge"
            await bridge_log.wait_for("ended", "close=1011", logger="trio_bridge.server")
        # still serving
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            await check_echo(ws, b"new session")
    (error,) = errors(caplog)
    assert "internal error" in error.getMessage()
    assert error.exc_info is not None
    assert "RuntimeError: injected bug in a target transport" in caplog.text  # the traceback
