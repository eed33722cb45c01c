"""``trio-bridge-replay serve FILE --web /usr/share/novnc``: watch a recording in a browser.

A VNC session is recorded in the test (x11vnc on Xvfb, through a recording bridge), then
replayed by the real command line with ``--web``; headless Chromium opens the URL it
prints, and noVNC, served from the same port, shows the recorded screen (a screenshot is
saved as tests/artifacts/replay-web-chromium.png, git-ignored). The page's
Pause button and the controls' JSON state are checked too, and the controls themselves
(pause holds the play, resume lets it go on) with a plain WebSocket client.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from websockets.trio.client import connect

from trio_bridge.pytest_plugin import StartBridge, StartReplay
from trio_bridge.recording import Kind

from .test_browser import ARTIFACTS, NOVNC, DevTools, chromium_argv, close_to, page_socket, running
from .test_replay import DOWN, write_recording
from .test_replay_rfb import BACKGROUND, record, vnc_desktop

FRAME = "document.getElementById('client')?.contentDocument"
CENTRE_PIXEL = f"""(() => {{
    const c = {FRAME}?.querySelector('#noVNC_container canvas');
    if (!c || !c.width) return null;
    return Array.from(c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data);
}})()"""
REPLAY_MAIN = "import sys; from trio_bridge.replay.cli import main; sys.exit(main())"


async def test_serve_web_shows_the_recorded_screen_in_novnc(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with vnc_desktop(nursery) as desktop:
            path = await record(start_ws_bridge, desktop.vnc, tmp_path)
        async with AsyncExitStack() as stack:
            argv = [
                sys.executable, "-c", REPLAY_MAIN, "serve", str(path),
                "--listen", "127.0.0.1:0", "--web", str(NOVNC),
            ]  # fmt: skip
            replay = await stack.enter_async_context(running(nursery, "replay", argv))
            page_url = (await replay.wait_for(r"^open (http://127\.0\.0\.1:\d+/replay\.html)$"))[1]
            chromium = await stack.enter_async_context(
                running(nursery, "chromium", chromium_argv(tmp_path / "chromium-profile"))
            )
            devtools_port = int(
                (await chromium.wait_for(r"DevTools listening on ws://[^:]+:(\d+)/"))[1]
            )
            page_socket_url = await trio.to_thread.run_sync(page_socket, devtools_port)
            async with connect(page_socket_url, max_size=None) as ws:
                page = DevTools(ws)
                await page.call("Page.navigate", url=page_url)
                await page.until(
                    CENTRE_PIXEL, "the recorded screen", lambda p: close_to(p, BACKGROUND)
                )
                shot = await page.call("Page.captureScreenshot", format="png")
                ARTIFACTS.mkdir(exist_ok=True)
                (ARTIFACTS / "replay-web-chromium.png").write_bytes(base64.b64decode(shot["data"]))
                await page.evaluate("document.getElementById('pause').click()")
                await page.until(
                    "document.getElementById('state').textContent", "state", "paused at 1x".__eq__
                )


def control(port: int, action: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/replay/{action}", timeout=10) as reply:
        state: dict[str, object] = json.loads(reply.read())
        return state


@pytest.mark.parametrize("web", [NOVNC])
async def test_pause_holds_the_play_and_resume_and_speed_go_on(
    start_replay_server: StartReplay, tmp_path: Path, web: Path
) -> None:
    path = write_recording(
        tmp_path / "t.tbrec",
        [(Kind.BINARY, DOWN, 1_000, b"first"), (Kind.BINARY, DOWN, 401_000, b"second")],
    )
    server = await start_replay_server(path, web=web)
    with trio.fail_after(10):
        async with connect(server.url) as ws:
            assert await ws.recv() == b"first"
            state = await trio.to_thread.run_sync(control, server.port, "pause")
            assert state == {"paused": True, "speed": 1.0}
            with trio.move_on_after(0.8):  # twice the recorded spacing
                await ws.recv()
                raise AssertionError("a message came while paused")
            await trio.to_thread.run_sync(control, server.port, "speed?x=8")
            resumed = trio.current_time()
            state = await trio.to_thread.run_sync(control, server.port, "resume")
            assert state == {"paused": False, "speed": 8.0}
            assert await ws.recv() == b"second"
            # What was left of the 400 ms (at most all of it) at 8x: at most 50 ms; at 1x
            # it would have been nearly 400 ms.
            assert trio.current_time() - resumed < 0.3
    page = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{server.port}/")
    assert b'src="vnc.html?autoconnect=true' in page and b'id="pause"' in page
    assert await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{server.port}/vnc.html")
    missing = f"http://127.0.0.1:{server.port}/../../etc/passwd"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        await trio.to_thread.run_sync(_get, missing)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        data: bytes = reply.read()
        return data
