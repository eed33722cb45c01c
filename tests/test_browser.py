"""End to end in a real browser: noVNC from the bridge's --web, over the bridge, to x11vnc.

    Xvfb  <-  a tiny X client paints a window one known colour and listens for clicks
     ^
    x11vnc (RFB on a loopback port)
     ^
    trio-bridge --web /usr/share/novnc --metrics ...   (the real command line)
     ^
    headless Chromium opening vnc.html?autoconnect=true, driven over the DevTools
    protocol with websockets' own client

The test asserts what a person would check: noVNC says it is connected, the canvas
shows the colour painted on the X display, and a click in the browser reaches the X
window (the X client receives the ButtonPress at the right spot) after crossing the
bridge upstream (its metrics count the bytes). A screenshot of the page is saved under
tests/artifacts/ (git-ignored) and its path printed.

Nothing here skips: ``./dev`` installs xvfb, x11vnc, novnc and chromium, so a missing
program is a failure of the set-up, not a reason to pass.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio
from websockets.trio.client import ClientConnection, connect

from .conftest import free_port
from .test_metrics import Samples, parse, value

NOVNC = Path("/usr/share/novnc")
ARTIFACTS = Path(__file__).parent / "artifacts"
COLOUR = (222, 40, 150)  # painted on the X display; nothing else draws this
SCREEN = (320, 240)
TOLERANCE = 8  # per channel, in case a lossy encoding is ever chosen for the fill


# -- processes ------------------------------------------------------------------------------


class Program:
    """A child process in its own process group, its output collected line by line."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._new_line = trio.Event()

    async def collect(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async with self.process.stdout as output:
            async for chunk in output:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in lines)
                self._new_line.set()
                self._new_line = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first output line matching ``pattern`` (a regular expression)."""
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match := re.search(pattern, line):
                    return match
            seen = len(self.lines)
            if self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited: {self.output()}")
            with trio.move_on_after(0.2):  # also notices an exit without output
                await self._new_line.wait()

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    async def stop(self) -> int:
        """SIGTERM the group, SIGKILL after 5 s; always reaps."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                _signal_group(self.process.pid, signal.SIGTERM)
                with trio.move_on_after(5):
                    await self.process.wait()
            _signal_group(self.process.pid, signal.SIGKILL)
            status = await self.process.wait()
        return status  # outside: to mypy a cancel scope may swallow an exception


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signum)


@asynccontextmanager
async def running(
    nursery: trio.Nursery, name: str, argv: list[str], **options: Any
) -> AsyncIterator[Program]:
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **options,
    )
    program = Program(name, process)
    nursery.start_soon(program.collect)
    try:
        yield program
    except BaseException:
        print(f"\n--- {name} (last lines) ---\n{program.output()}")  # for the CI log
        raise
    finally:
        await program.stop()


# -- a minimal X11 client ---------------------------------------------------------------------


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _scale(channel: int, mask: int) -> int:
    shift = (mask & -mask).bit_length() - 1
    top = mask >> shift
    return (channel * top // 255) << shift


class XWindow:
    """One full-screen, override-redirect window of a solid colour, in the X core
    protocol over the display's Unix socket; it reports the button presses it receives.

    ``xsetroot -solid`` does not paint Xvfb's root here (see design notes); a mapped
    window with a background pixel is painted by the server itself, so no drawing and
    no client library is needed.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.presses: list[tuple[int, int, int]] = []  # (button, x, y) in window pixels
        self._pressed = trio.Event()

    async def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("the X server closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    @classmethod
    async def open(cls, display: int, colour: tuple[int, int, int]) -> XWindow:
        window = cls(await trio.open_unix_socket(f"/tmp/.X11-unix/X{display}"))
        await window._setup(colour)
        return window

    async def _setup(self, colour: tuple[int, int, int]) -> None:
        await self.stream.send_all(struct.pack("<BxHHHHxx", 0x6C, 11, 0, 0, 0))
        status, _, _, _, length = struct.unpack("<BBHHH", await self._read(8))
        body = await self._read(length * 4)
        if status != 1:
            raise RuntimeError(f"X server refused the connection: {body!r}")
        id_base = struct.unpack_from("<I", body, 4)[0]
        vendor_length = struct.unpack_from("<H", body, 16)[0]
        screen = 32 + vendor_length + _pad(vendor_length) + 8 * body[21]
        root = struct.unpack_from("<I", body, screen)[0]
        width, height = struct.unpack_from("<HH", body, screen + 20)
        root_visual = struct.unpack_from("<I", body, screen + 32)[0]
        masks = self._visual_masks(body, screen, root_visual)
        pixel = sum(_scale(c, m) for c, m in zip(colour, masks, strict=True))
        window = id_base | 1
        back_pixel, override_redirect, event_mask = 0x2, 0x200, 0x800
        values = (pixel, 1, 1 << 2)  # the events wanted: ButtonPress
        create = struct.pack(
            "<BBHIIhhHHHHII",
            1,  # CreateWindow
            0,  # depth: CopyFromParent
            8 + len(values),
            window,
            root,
            0,
            0,
            width,
            height,
            0,
            1,  # InputOutput
            0,  # visual: CopyFromParent
            back_pixel | override_redirect | event_mask,
        ) + struct.pack(f"<{len(values)}I", *values)
        map_window = struct.pack("<BxHI", 8, 2, window)
        get_input_focus = struct.pack("<BxH", 43, 1)  # a round trip: mapped when answered
        await self.stream.send_all(create + map_window + get_input_focus)
        while True:
            reply = await self._read(32)
            if reply[0] == 0:
                raise RuntimeError(f"X error {reply[1]} while creating the window")
            if reply[0] == 1:
                return

    @staticmethod
    def _visual_masks(body: bytes, screen: int, visual: int) -> tuple[int, int, int]:
        position = screen + 40
        for _ in range(body[screen + 39]):
            count = struct.unpack_from("<H", body, position + 2)[0]
            position += 8
            for _ in range(count):
                visual_id, _, _, _, red, green, blue = struct.unpack_from(
                    "<IBBHIII", body, position
                )
                if visual_id == visual:
                    return red, green, blue
                position += 24
        raise RuntimeError("the root visual is not described")

    async def listen(self) -> None:
        """Record button presses until the connection is closed."""
        while True:
            try:
                event = await self._read(32)
            except (EOFError, trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if event[0] & 0x7F == 4:  # ButtonPress
                x, y = struct.unpack_from("<hh", event, 24)
                self.presses.append((event[1], x, y))
                self._pressed.set()

    async def next_press(self) -> tuple[int, int, int]:
        while not self.presses:
            await self._pressed.wait()
            self._pressed = trio.Event()
        return self.presses.pop(0)


async def start_xvfb(nursery: trio.Nursery, stack: AsyncExitStack) -> int:
    """Xvfb on the first free display, which it reports on a pipe (-displayfd)."""
    read_end, write_end = os.pipe()
    width, height = SCREEN
    argv = [
        "Xvfb", "-displayfd", str(write_end), "-screen", "0", f"{width}x{height}x24",
        "-nolisten", "tcp", "-noreset",
    ]  # fmt: skip
    try:
        await stack.enter_async_context(running(nursery, "Xvfb", argv, pass_fds=(write_end,)))
    finally:
        os.close(write_end)
    async with trio.lowlevel.FdStream(read_end) as pipe:
        number = b""
        while not number.endswith(b"\n"):
            chunk = await pipe.receive_some(16)
            assert chunk, "Xvfb exited before reporting its display"
            number += chunk
    return int(number)


# -- the DevTools protocol --------------------------------------------------------------------


class DevTools:
    """Commands to one page over its DevTools WebSocket; events are ignored."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(
        self, expression: str, what: str, check: Callable[[Any], bool] = bool, timeout: float = 20
    ) -> Any:
        """Evaluate until ``check`` passes (the page works at its own pace); on time-out,
        fail saying what was awaited, the last answer and noVNC's status line."""
        answer = None
        with trio.move_on_after(timeout):
            while True:
                answer = await self.evaluate(expression)
                if check(answer):
                    return answer
                await trio.sleep(0.1)
        status = await self.evaluate("document.getElementById('noVNC_status')?.textContent")
        raise AssertionError(f"no {what} after {timeout} s: {answer!r}; noVNC: {status!r}")

    async def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )


def page_socket(devtools_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json", timeout=10) as reply:
        targets = json.loads(reply.read())
    url: str = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    return url


CANVAS = "document.querySelector('#noVNC_container canvas')"
CENTRE_PIXEL = f"""(() => {{
    const c = {CANVAS};
    if (!c || !c.width) return null;
    return Array.from(c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data);
}})()"""


def close_to(pixel: list[int] | None, colour: tuple[int, int, int]) -> bool:
    return pixel is not None and all(
        abs(p - c) <= TOLERANCE for p, c in zip(pixel[:3], colour, strict=True)
    )


async def scrape(port: int) -> Samples:
    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            data: bytes = reply.read()
            return data

    return parse((await trio.to_thread.run_sync(get)).decode())


# -- the test ----------------------------------------------------------------------------------


def x11vnc_argv(display: int, port: int) -> list[str]:
    return [
        "x11vnc", "-display", f":{display}", "-rfbport", str(port),
        "-localhost", "-forever", "-shared", "-nopw",
    ]  # fmt: skip


def bridge_argv(port: int, vnc_port: int, metrics_port: int) -> list[str]:
    """The real command line, as an operator would type it."""
    return [
        sys.executable, "-m", "trio_bridge.cli", "-v",
        f"127.0.0.1:{port}", f"127.0.0.1:{vnc_port}",
        "--web", str(NOVNC), "--metrics", f"127.0.0.1:{metrics_port}",
    ]  # fmt: skip


def chromium_argv(profile: Path) -> list[str]:
    """Headless Chromium as root, per the design notes, with its DevTools on a free port."""
    return [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "--window-size=800,600", "about:blank",
    ]  # fmt: skip


async def test_novnc_in_chromium_through_the_bridge(nursery: trio.Nursery, tmp_path: Path) -> None:
    vnc_port, bridge_port, metrics_port = free_port(), free_port(), free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "novnc-chromium.png"
    screenshot.unlink(missing_ok=True)
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            display = await start_xvfb(nursery, stack)
            window = await XWindow.open(display, COLOUR)
            stack.push_async_callback(window.stream.aclose)
            nursery.start_soon(window.listen)

            x11vnc = await stack.enter_async_context(
                running(nursery, "x11vnc", x11vnc_argv(display, vnc_port))
            )
            await x11vnc.wait_for(rf"PORT={vnc_port}")

            bridge = await stack.enter_async_context(
                running(nursery, "trio-bridge", bridge_argv(bridge_port, vnc_port, metrics_port))
            )
            await bridge.wait_for("listening on")

            chromium = await stack.enter_async_context(
                running(nursery, "chromium", chromium_argv(tmp_path / "chromium-profile"))
            )
            devtools_port = int(
                (await chromium.wait_for(r"DevTools listening on ws://[^:]+:(\d+)/"))[1]
            )
            page_url = await trio.to_thread.run_sync(page_socket, devtools_port)

            async with connect(page_url, max_size=None) as ws:
                page = DevTools(ws)
                query = f"autoconnect=true&host=127.0.0.1&port={bridge_port}&path=websockify"
                await page.call(
                    "Page.navigate", url=f"http://127.0.0.1:{bridge_port}/vnc.html?{query}"
                )

                # noVNC says it is connected ...
                await page.until(
                    "document.documentElement?.classList.contains('noVNC_connected')", "connected"
                )
                status = await page.evaluate("document.getElementById('noVNC_status').textContent")
                assert "Connected" in status, status
                # ... and the canvas shows the X display's colour.
                await page.until(CENTRE_PIXEL, "painted colour", lambda p: close_to(p, COLOUR))
                width, height = await page.evaluate(f"[{CANVAS}.width, {CANVAS}.height]")
                assert (width, height) == SCREEN

                # A click in the browser crosses the bridge and reaches the X window.
                before = await scrape(metrics_port)
                up_before = value(before, "trio_bridge_bytes_total", direction="client_to_target")
                left, top = await page.evaluate(
                    f"(r => [r.left, r.top])({CANVAS}.getBoundingClientRect())"
                )
                target_x, target_y = 80, 60
                await page.click(left + target_x + 0.5, top + target_y + 0.5)
                button, x, y = await window.next_press()
                assert button == 1
                assert abs(x - target_x) <= 1 and abs(y - target_y) <= 1, (x, y)
                after = await scrape(metrics_port)
                up_after = value(after, "trio_bridge_bytes_total", direction="client_to_target")
                assert up_after >= up_before + 6  # at least one RFB PointerEvent (6 bytes)
                assert value(after, "trio_bridge_sessions_open") == 1

                shot = await page.call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))

                # noVNC's Disconnect button closes cleanly, without a status code (1005);
                # leaving the page instead would stop at noVNC's "leave this page?" prompt.
                await page.evaluate("document.getElementById('noVNC_disconnect_button').click()")
                ended = rf"session \w+ ended: .* target=127\.0\.0\.1:{vnc_port} .* close=100[05]"
                await bridge.wait_for(ended + " by client")

            # The files came from the bridge; it stops cleanly.
            await bridge.wait_for(r"GET /vnc\.html\?autoconnect=\S* -> 200")  # values redacted
            await bridge.wait_for(r"GET /app/ui\.js -> 200")
            assert await bridge.stop() == 0, bridge.output()
    print(f"\nscreenshot of noVNC in Chromium: {screenshot}")
    assert screenshot.stat().st_size > 1000
