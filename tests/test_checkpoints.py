"""The relay's checkpoint-free I/O keeps Trio's promises (the contract in trio_bridge/netio.py).

A session whose sockets are always ready never waits, so only its Fairness ticks let
other tasks run and cancellation arrive. These tests build such a session: its flooding
peer and its draining peer are other processes, which the bridge's event loop cannot
slow down (peers in the test's own event loop would stop while the flood held it, the
bridge would find nothing to read and wait: no test at all), and the bridge has more
work per byte than they do, so its socket stays ready: tiny frames from the client (a
parse and a write per 16 bytes), or incompressible data from the target, deflated. A
flood stops by itself after ``FLOOD_SECONDS``, so a bridge that breaks the contract
fails these tests rather than hanging them. The spliced flood is the exception: the
kernel moves it faster than the target process can write, so the bridge waits often
and that case holds even without the ticks; it is here for the bound.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from websockets.trio.client import connect

from trio_bridge import Bridge, Config, Limits, TcpAddress

from .conftest import BridgeStarter, TcpTarget, loopback_listener, ws_request

FLOOD_SECONDS = 30.0
ROUND_TRIPS = 30  # at least, and until the flood has moved FLOOD_PROGRESS more bytes
FLOOD_PROGRESS = 1 << 20
# With the ticks the slowest round trip took <0.1 s alone and <0.5 s beside two CPU
# burners on 2 cores; with a tick per read instead of per frame, 12 s (tiny frames).
ROUND_TRIP_BOUND = 2.0
CANCEL_BOUND = 2.0

# A peer in its own process, on a socket the test hands over. "frames" sends 16-byte
# masked binary frames, "bytes" 1 MiB of random bytes, over and over; "drain" reads and
# discards, and says "flowing" after 256 KiB. A closed connection ends it quietly.
PEER = r"""
import os, socket, sys, time
mode, fd, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(fileno=fd)
sock.setblocking(True)
deadline = time.monotonic() + seconds
try:
    if mode == "frames":
        from websockets.frames import Frame, Opcode
        frame = Frame(Opcode.BINARY, bytes(16)).serialize(mask=True, extensions=[])
        data = frame * ((1 << 20) // len(frame))
    else:
        data = os.urandom(1 << 20)
    if mode == "drain":
        buffer, received = bytearray(1 << 20), 0
        while time.monotonic() < deadline and (n := sock.recv_into(buffer)):
            if received < 1 << 18 <= received + n:
                os.write(1, b"flowing\n")
            received += n
    else:
        while time.monotonic() < deadline:
            sock.sendall(data)
except OSError:
    pass
"""


@dataclass(frozen=True)
class Flood:
    up: bool  # the client floods; else the target does
    compression: bool = False
    zero_copy: bool = False


FLOODS = [
    pytest.param(Flood(up=True), id="client-tiny-frames"),
    pytest.param(Flood(up=False, compression=True), id="target-deflated"),
    pytest.param(Flood(up=False, zero_copy=True), id="target-spliced"),
]


@asynccontextmanager
async def peer(mode: str, sock: trio.socket.SocketType) -> AsyncIterator[trio.Process]:
    """Run ``mode`` on ``sock`` in a child process; killed on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", PEER, mode, str(sock.fileno()), str(FLOOD_SECONDS)],
        pass_fds=(sock.fileno(),),
        stdout=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def open_ws(port: int, flood: Flood) -> trio.socket.SocketType:
    """A raw client socket past the opening handshake, ready to hand to a peer process."""
    extension = "permessage-deflate" if flood.compression else None
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    await sock.send(ws_request(Sec_WebSocket_Extensions=extension))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await sock.recv(4096)
        assert chunk, "the bridge closed the connection during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101 "), response
    assert response.endswith(b"\r\n\r\n")  # nothing after: the target has sent nothing yet
    assert (b"permessage-deflate" in response) == flood.compression
    return sock


def target_listener() -> tuple[trio.socket.SocketType, TcpAddress]:
    listener = trio.socket.from_stdlib_socket(loopback_listener())
    host, port = listener.getsockname()[:2]
    return listener, TcpAddress(host, port)


@asynccontextmanager
async def flooding(
    flood: Flood, port: int, target: trio.socket.SocketType
) -> AsyncIterator[tuple[trio.Process, trio.Process]]:
    """One session through the bridge on ``port``, flooded until the body ends; yields
    the sending and the draining peer once the drain has seen the flood."""
    client = await open_ws(port, flood)
    with client:
        target_side, _ = await target.accept()
        with target_side:
            sender, drainer = (client, target_side) if flood.up else (target_side, client)
            async with (
                peer("drain", drainer) as drain,
                peer("frames" if flood.up else "bytes", sender) as send,
            ):
                assert drain.stdout is not None
                assert await drain.stdout.receive_some(64) == b"flowing\n"
                yield send, drain


def moved(bridge: Bridge) -> int:
    return sum(s.stats.bytes_up + s.stats.bytes_down for s in bridge.sessions)


@pytest.mark.parametrize("flood", FLOODS)
async def test_a_flooding_session_leaves_another_sessions_round_trips_prompt(
    start_bridge: BridgeStarter, echo_target: TcpTarget, flood: Flood
) -> None:
    listener, address = target_listener()
    running = await start_bridge(
        address, heartbeat=None, compression=flood.compression, zero_copy=flood.zero_copy
    )
    other = await start_bridge(echo_target.address, heartbeat=None)
    with trio.fail_after(FLOOD_SECONDS / 2), listener:
        async with (
            connect(other.url) as ws,
            flooding(flood, running.port, listener) as peers,
        ):
            until = moved(running.bridge) + FLOOD_PROGRESS
            slowest, i = 0.0, 0
            while i < ROUND_TRIPS or moved(running.bridge) < until:
                start = trio.current_time()
                await ws.send(b"round trip %d" % i)
                assert await ws.recv() == b"round trip %d" % i
                slowest = max(slowest, trio.current_time() - start)
                i += 1
            assert all(p.poll() is None for p in peers), "the flood ended too soon"
    assert slowest < ROUND_TRIP_BOUND, f"a round trip took {slowest:.3f} s during the flood"


@pytest.mark.parametrize("flood", FLOODS)
async def test_cancelling_a_bridge_mid_flood_ends_it_promptly(flood: Flood) -> None:
    listener, address = target_listener()
    config = Config(
        target=address,
        limits=Limits(heartbeat=None),
        compression=flood.compression,
        zero_copy=flood.zero_copy,
    )
    ws_listener = loopback_listener()
    port = ws_listener.getsockname()[1]
    with trio.fail_after(FLOOD_SECONDS / 2), listener:
        # The flood outlives the bridge: nothing but the cancellation may end the relay.
        async with AsyncExitStack() as stack:
            async with trio.open_nursery() as nursery:
                bridge = await nursery.start(Bridge(config).serve, [ws_listener])
                await stack.enter_async_context(flooding(flood, port, listener))
                assert len(bridge.sessions) == 1
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            stopped = trio.current_time() - cancelled_at
    assert stopped < CANCEL_BOUND, f"the bridge took {stopped:.3f} s to stop"
