"""The pytest plugin used as a client author uses it: its fixtures and the public API only.

Nothing here imports the project's tests or private modules; the fixtures come from
the ``pytest11`` entry point installed with the package (docs/pytest-plugin.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge import TcpAddress
from trio_bridge.pytest_plugin import StartBridge, StartReplay
from trio_bridge.recording import load_recording


async def test_my_client_through_a_bridge_to_an_echo_service(ws_bridge_url: str) -> None:
    with trio.fail_after(10):
        async with connect(ws_bridge_url, subprotocols=[Subprotocol("binary")]) as ws:
            assert ws.subprotocol == "binary"
            await ws.send(b"\x00\x01hello")
            assert await ws.recv() == b"\x00\x01hello"


async def shout(stream: trio.SocketStream) -> None:
    """My own TCP service: answers in capitals."""
    async for chunk in stream:
        await stream.send_all(chunk.upper())


class TestMyOwnService:
    @pytest.fixture
    async def ws_bridge_target(self, nursery: trio.Nursery) -> TcpAddress:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, shout, listeners)
        return TcpAddress("127.0.0.1", listeners[0].socket.getsockname()[1])

    async def test_the_bridge_relays_to_the_overridden_target(self, ws_bridge_url: str) -> None:
        with trio.fail_after(10):
            async with connect(ws_bridge_url) as ws:
                await ws.send(b"quiet please")
                assert await ws.recv() == b"QUIET PLEASE"


@pytest.fixture
async def replay_recording(
    start_ws_bridge: StartBridge, tcp_echo_target: TcpAddress, tmp_path: Path
) -> Path:
    """A recording of a short session with the echo service, made by a recording bridge."""
    running = await start_ws_bridge(tcp_echo_target, record=tmp_path, idle_timeout=30)
    with trio.fail_after(10):
        async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
            for word in (b"one", b"two", b"three"):
                await ws.send(word)
                assert await ws.recv() == word
        (path,) = await running.recordings(1)
    return path


async def test_the_recording_has_the_session(replay_recording: Path) -> None:
    recording = load_recording(replay_recording)
    assert recording.status.complete
    data = [f.payload for f in recording.frames() if f.is_data]
    assert data == [b"one", b"one", b"two", b"two", b"three", b"three"]


async def test_my_client_against_a_recorded_session(replay_server_url: str) -> None:
    with trio.fail_after(10):
        async with connect(replay_server_url, subprotocols=[Subprotocol("binary")]) as ws:
            for word in (b"one", b"two", b"three"):
                await ws.send(word)
                assert await ws.recv() == word


async def test_the_replay_server_tells_whether_my_client_behaved(
    start_replay_server: StartReplay, replay_recording: Path
) -> None:
    server = await start_replay_server(replay_recording, lockstep=True, speed=10)
    with trio.fail_after(10):
        async with connect(server.url, subprotocols=[Subprotocol("binary")]) as ws:
            for word in (b"one", b"TWO", b"three"):
                await ws.send(word)
                await ws.recv()
        (report,) = await server.wait_reports(1)
    assert not report.ok
    (difference,) = report.differences
    assert difference.index == 2 and difference.kind == "different"
    assert difference.got == b"TWO"
