"""``drive --compare rfb`` against a real VNC server: x11vnc on Xvfb.

The recording is made in the test: a small RFB client (this file) talks to x11vnc
through a recording bridge, asks for Hextile (which x11vnc then uses), and stops once
the whole screen has arrived. Driving that recording against x11vnc, the comparator
asks for Raw and CopyRect instead, so the bytes differ and the screens must not:

- the same picture: the report says the same as the recording;
- another window on part of the screen: the report names that region and its colours.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge import TcpAddress
from trio_bridge.pytest_plugin import DriveRecording, StartBridge
from trio_bridge.replay import drive
from trio_bridge.replay.rfb import (
    COPY_RECT,
    CURSOR,
    DESKTOP_SIZE,
    HEXTILE,
    RAW,
    RRE,
    TIGHT,
    RfbComparator,
    RfbSide,
)
from trio_bridge.replay.screen import Screen

from .conftest import free_port
from .test_browser import (
    CENTRE_PIXEL,
    NOVNC,
    DevTools,
    XWindow,
    _pad,
    _scale,
    chromium_argv,
    close_to,
    page_socket,
    running,
    start_xvfb,
    x11vnc_argv,
)

BACKGROUND = (222, 40, 150)
PATCH = (30, 200, 60)
PATCH_AT = (50, 37, 61, 41)  # x, y, width, height: across tile edges (16 px grids)

# noVNC's pixel format: 32 bits, depth 24, little-endian, true colour, red at bit 0.
NOVNC_PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)


@dataclass
class Desktop:
    display: int
    vnc: TcpAddress


@asynccontextmanager
async def vnc_desktop(nursery: trio.Nursery) -> AsyncIterator[Desktop]:
    """Xvfb (320x240) with a full-screen window of BACKGROUND, served by x11vnc."""
    async with AsyncExitStack() as stack:
        display = await start_xvfb(nursery, stack)
        window = await XWindow.open(display, BACKGROUND)
        stack.push_async_callback(window.stream.aclose)
        port = free_port()
        x11vnc = await stack.enter_async_context(
            running(nursery, "x11vnc", x11vnc_argv(display, port))
        )
        await x11vnc.wait_for(rf"PORT={port}")
        yield Desktop(display, TcpAddress("127.0.0.1", port))


async def paint_patch(display: int, colour: tuple[int, int, int]) -> trio.SocketStream:
    """A window of ``colour`` at PATCH_AT, mapped when this returns (a round trip)."""
    window = XWindow(await trio.open_unix_socket(f"/tmp/.X11-unix/X{display}"))
    await window.stream.send_all(struct.pack("<BxHHHHxx", 0x6C, 11, 0, 0, 0))
    status, _, _, _, length = struct.unpack("<BBHHH", await window._read(8))
    body = await window._read(length * 4)
    assert status == 1, body
    id_base = struct.unpack_from("<I", body, 4)[0]
    vendor_length = struct.unpack_from("<H", body, 16)[0]
    screen = 32 + vendor_length + _pad(vendor_length) + 8 * body[21]
    root = struct.unpack_from("<I", body, screen)[0]
    visual = struct.unpack_from("<I", body, screen + 32)[0]
    masks = XWindow._visual_masks(body, screen, visual)
    pixel = sum(_scale(c, m) for c, m in zip(colour, masks, strict=True))
    x, y, width, height = PATCH_AT
    wid = id_base | 1
    create = struct.pack(
        "<BBHIIhhHHHHII", 1, 0, 10, wid, root, x, y, width, height, 0, 1, 0, 0x2 | 0x200
    ) + struct.pack("<II", pixel, 1)
    map_window = struct.pack("<BxHI", 8, 2, wid)
    get_input_focus = struct.pack("<BxH", 43, 1)
    await window.stream.send_all(create + map_window + get_input_focus)
    while (reply := await window._read(32))[0] != 1:
        assert reply[0] != 0, f"X error {reply[1]}"
    return window.stream


class RfbClient:
    """Just enough of an RFB client: handshake, noVNC's pixel format, Hextile, updates;
    ``side`` (the comparator's own parser) holds the screen."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], receive: Callable[[], Awaitable[bytes]]
    ) -> None:
        self._send, self._receive = send, receive
        self.side = RfbSide()

    async def send(self, data: bytes) -> None:
        self.side.from_client(data)
        await self._send(data)

    async def until(self, done: Callable[[], object]) -> None:
        while not done():
            data = await self._receive()
            assert data, "the server closed the connection"
            self.side.from_server(data)
            assert not self.side.stopped, self.side.stopped

    async def start(self, preferred: int = HEXTILE) -> Screen:
        """Handshake, then the whole screen once, in the ``preferred`` encoding."""
        side = self.side
        await self.until(lambda: side.version)
        await self.send(b"RFB 003.008\n")
        await self.until(lambda: side.security_types)
        assert 1 in side.security_types, side.security_types
        await self.send(b"\x01")
        await self.until(lambda: side.security_result is not None)
        await self.send(b"\x01")  # ClientInit: shared
        await self.until(lambda: side.screen is not None)
        await self.send(b"\x00\x00\x00\x00" + NOVNC_PIXEL_FORMAT)
        encodings = (preferred, COPY_RECT, RAW, CURSOR, DESKTOP_SIZE)
        await self.send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))
        await self.request(incremental=False)
        await self.until(lambda: side.full_updates >= 1)
        assert side.screen is not None
        return side.screen

    async def next_update(self) -> None:
        seen = self.side.updates
        await self.request(incremental=True)
        await self.until(lambda: self.side.updates > seen)

    async def request(self, *, incremental: bool) -> None:
        assert self.side.screen is not None
        width, height = self.side.screen.width, self.side.screen.height
        await self.send(struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height))


async def record_vnc_session(url: str, preferred: int = HEXTILE) -> None:
    """Through a bridge: the handshake and one full-screen update, then a clean close."""
    async with connect(url, subprotocols=[Subprotocol("binary")]) as ws:

        async def receive() -> bytes:
            return await ws.recv(decode=False)

        await RfbClient(ws.send, receive).start(preferred)


def rgb(screen: Screen, x: int, y: int) -> tuple[int, int, int]:
    return screen.format.rgb(screen.pixel(x, y), screen.colours)


async def wait_until_shown(vnc: TcpAddress, colour: tuple[int, int, int]) -> None:
    """Until x11vnc serves the patch (it polls the X screen: a change shows up a little
    later), watched through its own updates, as a viewer would."""
    async with await trio.open_tcp_stream(vnc.host, vnc.port) as stream:
        client = RfbClient(stream.send_all, lambda: stream.receive_some(65536))
        screen = await client.start()
        x, y = PATCH_AT[0] + 1, PATCH_AT[1] + 1
        while rgb(screen, x, y) != colour:
            await client.next_update()


async def record(
    start_ws_bridge: StartBridge, vnc: TcpAddress, folder: Path, preferred: int = HEXTILE
) -> Path:
    bridge = await start_ws_bridge(vnc, record=folder)
    await record_vnc_session(bridge.url, preferred)
    (path,) = await bridge.recordings(1)
    return path


async def test_the_same_picture_matches_though_the_encodings_differ(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with vnc_desktop(nursery) as desktop:
            path = await record(start_ws_bridge, desktop.vnc, tmp_path)
            comparator = RfbComparator()
            report = await drive(path, target=desktop.vnc, compare=comparator, timeout=10)
            bridge = await start_ws_bridge(desktop.vnc)  # and through a bridge, as frames
            bridged = await drive(path, url=bridge.url, compare="rfb", delay=False)
    assert report.ok, "\n".join(report.lines())
    assert bridged.ok, "\n".join(bridged.lines())
    assert report.lines()[-1].startswith("result: same as the recording")
    assert comparator.recorded.updates >= 1 and comparator.live.updates >= 1
    # Hextile was recorded, Raw came live: the same screen in other bytes.
    assert report.received_bytes > report.expected_bytes


async def test_another_picture_reports_the_region_and_its_colours(
    nursery: trio.Nursery,
    start_ws_bridge: StartBridge,
    drive_recording: DriveRecording,
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    with trio.fail_after(60), pytest.raises(pytest.fail.Exception) as failure:
        async with vnc_desktop(nursery) as desktop:
            path = await record(start_ws_bridge, desktop.vnc, tmp_path)
            patch = await paint_patch(desktop.display, PATCH)
            try:
                await wait_until_shown(desktop.vnc, PATCH)
                await drive_recording(
                    path, target=desktop.vnc, compare="rfb", images=images, delay=False
                )
            finally:
                await patch.aclose()
    text = str(failure.value)
    x, y, width, height = PATCH_AT
    region = (
        f"region x={x} y={y} {width}x{height}: {width * height} pixels differ; "
        f"expected mostly rgb(222,40,150) #de2896, got mostly rgb(30,200,60) #1ec83c"
    )
    assert region in text, text
    assert text.count("@@ rfb screen") == 1, text  # reported once, not at every sync point
    written = sorted(images.iterdir())
    assert [p.name.rsplit("-", 1)[1] for p in written] == ["actual.png", "diff.png", "expected.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert f"images: {images}" in text


async def test_each_recorded_encoding_shows_the_same_screen(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    """Two colours on the screen, so that x11vnc uses more than a fill: Hextile's
    subrectangles, RRE's, Tight's palette. Each recording decodes to the screen the live
    server sends in Raw."""
    with trio.fail_after(60):
        async with vnc_desktop(nursery) as desktop:
            patch = await paint_patch(desktop.display, PATCH)
            try:
                await wait_until_shown(desktop.vnc, PATCH)
                for preferred in (HEXTILE, RRE, TIGHT):
                    folder = tmp_path / str(preferred)
                    folder.mkdir()
                    path = await record(start_ws_bridge, desktop.vnc, folder, preferred)
                    comparator = RfbComparator()
                    report = await drive(path, target=desktop.vnc, compare=comparator, delay=False)
                    assert report.ok, "\n".join(report.lines())
                    assert preferred in comparator.recorded.encodings_seen
                    assert not comparator.recorded.stopped
            finally:
                await patch.aclose()


async def test_a_novnc_session_matches_the_server_showing_the_same_picture(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The issue's case: noVNC in Chromium, through `trio-bridge --record`, to x11vnc.
    noVNC negotiates Tight, which the comparator decodes on the recorded side."""
    folder = tmp_path / "recorded"
    folder.mkdir()
    with trio.fail_after(90):
        async with vnc_desktop(nursery) as desktop, AsyncExitStack() as stack:
            port = free_port()
            argv = [
                sys.executable, "-m", "trio_bridge.cli", "-v", f"127.0.0.1:{port}",
                str(desktop.vnc), "--web", str(NOVNC), "--record", str(folder),
            ]  # fmt: skip
            bridge = await stack.enter_async_context(running(nursery, "trio-bridge", argv))
            await bridge.wait_for("listening on")
            await show_in_novnc(nursery, stack, tmp_path, port)
            await bridge.wait_for(r"session \w+ ended: ")
            assert await bridge.stop() == 0, bridge.output()  # the recording is complete
            (path,) = folder.iterdir()
            comparator = RfbComparator()
            report = await drive(path, target=desktop.vnc, compare=comparator, timeout=10)
    assert report.ok, "\n".join(report.lines())
    # Tight recorded (pseudo-encodings aside), Raw live: the same screen in other bytes.
    recorded = {e for e in comparator.recorded.encodings_seen if e >= 0}
    live = {e for e in comparator.live.encodings_seen if e >= 0}
    assert TIGHT in recorded and recorded <= {TIGHT, COPY_RECT}, recorded
    assert RAW in live and live <= {RAW, COPY_RECT}, live
    assert comparator.recorded.full_updates >= 1 and not comparator.recorded.stopped


async def show_in_novnc(
    nursery: trio.Nursery, stack: AsyncExitStack, tmp_path: Path, port: int
) -> None:
    """noVNC from the bridge's --web, connected through it, until the canvas shows
    BACKGROUND; then its Disconnect button."""
    chromium = await stack.enter_async_context(
        running(nursery, "chromium", chromium_argv(tmp_path / "chromium-profile"))
    )
    devtools_port = int((await chromium.wait_for(r"DevTools listening on ws://[^:]+:(\d+)/"))[1])
    page_url = await trio.to_thread.run_sync(page_socket, devtools_port)
    async with connect(page_url, max_size=None) as ws:
        page = DevTools(ws)
        query = f"autoconnect=true&host=127.0.0.1&port={port}&path=websockify"
        await page.call("Page.navigate", url=f"http://127.0.0.1:{port}/vnc.html?{query}")
        await page.until(CENTRE_PIXEL, "painted colour", lambda p: close_to(p, BACKGROUND))
        await page.evaluate("document.getElementById('noVNC_disconnect_button').click()")
