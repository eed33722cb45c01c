"""The first five minutes: the demo desktop that `./dev serve` starts, end to end.

`./dev serve` without arguments, when nothing listens on localhost:5900, runs
`./dev demo 6080`; these tests run that same `./dev demo PORT` (on a free port, with
this interpreter's venv) and check what a person would:

- it prints the URL to open; headless Chromium opens it, noVNC (served by the bridge's
  --web) connects through the bridge, and the canvas shows the desktop (an xterm: many
  colours, light and dark), not a blank or black screen;
- typing in the browser reaches the xterm's shell: the keys cross noVNC, the bridge,
  x11vnc and the X server, and the shell runs the typed command, which writes to a FIFO
  this test reads;
- Ctrl-C (SIGINT to the foreground process group, where `./dev` exec'd the bridge), or
  SIGTERM to the bridge alone, stops everything: no process of that run (Xvfb, xterm, the
  shell in it, x11vnc) is left. Each run's processes are found by a variable in their
  environment, which they all inherit.

A screenshot of the page is saved under tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from websockets.trio.client import connect

from .conftest import free_port
from .test_browser import ARTIFACTS, CANVAS, DevTools, Program, chromium_argv, page_socket, running

DEV = Path(__file__).resolve().parent.parent / "dev"
MARK = "TRIO_BRIDGE_DEMO_RUN"
TYPED = "echo typed-in-xterm >$DEMO_FIFO\n"

# Over the whole canvas: how many distinct colours, and how many light and dark pixels.
CANVAS_SUMMARY = f"""(() => {{
    const c = {CANVAS};
    if (!c || !c.width) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const colours = new Set();
    let light = 0, dark = 0;
    for (let i = 0; i < d.length; i += 4) {{
        colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        const sum = d[i] + d[i + 1] + d[i + 2];
        if (sum > 600) light++; else if (sum < 150) dark++;
    }}
    return {{colours: colours.size, light, dark, pixels: d.length / 4}};
}})()"""


def painted(summary: dict[str, int] | None) -> bool:
    """An xterm on the screen: mostly its light background, some dark text, antialiased."""
    return (
        summary is not None
        and summary["colours"] >= 3
        and summary["light"] > summary["pixels"] // 4
        and summary["dark"] > 0
    )


def processes_of(run: str) -> dict[int, str]:
    """pid -> name of every process whose environment carries this run's mark."""
    wanted = f"{MARK}={run}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        if wanted in environ.split(b"\0"):
            found[int(entry.name)] = name
    return found


async def all_gone(run: str, timeout: float = 10) -> dict[int, str]:
    """Wait (on pidfds, not by polling) until no process of the run is left, for up to
    ``timeout``; returns what is still there."""
    with trio.move_on_after(timeout):
        while left := processes_of(run):
            for pid in left:
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                try:
                    await trio.lowlevel.wait_readable(pidfd)  # readable once it has exited
                finally:
                    os.close(pidfd)
    return processes_of(run)


async def start_demo(
    stack: AsyncExitStack, nursery: trio.Nursery, run: str, **env: str
) -> tuple[Program, str, int]:
    """`./dev demo PORT` as `./dev serve` runs it, in its own process group (as a shell
    runs a foreground job); returns it, the URL it printed and its port."""
    port = free_port()
    environment = {**os.environ, "TRIO_BRIDGE_VENV": sys.prefix, MARK: run, **env}
    demo = await stack.enter_async_context(
        running(nursery, "./dev demo", [str(DEV), "demo", str(port)], env=environment)
    )
    url = (await demo.wait_for(r"trio-bridge demo: open (http://\S+)"))[1]
    await demo.wait_for(rf"listening on 127\.0\.0\.1:{port}, relaying to .*dev demo-desktop")
    names = set(processes_of(run).values())
    assert {"Xvfb", "xterm", "x11vnc"} <= names, names
    return demo, url, port


async def type_text(page: DevTools, text: str) -> None:
    """Key presses as a person's (keyDown/keyUp with the key's name), not pasted text."""
    for char in text:
        if char == "\n":
            key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
            await page.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        else:
            key = {"key": char}
            await page.call("Input.dispatchKeyEvent", type="keyDown", text=char, **key)
        await page.call("Input.dispatchKeyEvent", type="keyUp", **key)


async def test_demo_desktop_in_chromium_then_ctrl_c(nursery: trio.Nursery, tmp_path: Path) -> None:
    run = uuid.uuid4().hex
    fifo = tmp_path / "typed"
    os.mkfifo(fifo)
    # Read-write, so that reading waits for a writer instead of seeing end of file.
    typed = trio.lowlevel.FdStream(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "demo-chromium.png"
    screenshot.unlink(missing_ok=True)
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            stack.push_async_callback(typed.aclose)
            demo, url, port = await start_demo(stack, nursery, run, DEMO_FIFO=str(fifo))
            assert url == (
                f"http://127.0.0.1:{port}/vnc.html?autoconnect=1&resize=scale&path=websockify"
            )

            chromium = await stack.enter_async_context(
                running(nursery, "chromium", chromium_argv(tmp_path / "chromium-profile"))
            )
            devtools_port = int(
                (await chromium.wait_for(r"DevTools listening on ws://[^:]+:(\d+)/"))[1]
            )
            async with connect(
                await trio.to_thread.run_sync(page_socket, devtools_port), max_size=None
            ) as ws:
                page = DevTools(ws)
                await page.call("Page.navigate", url=url)
                await page.until(
                    "document.documentElement?.classList.contains('noVNC_connected')", "connected"
                )
                summary = await page.until(CANVAS_SUMMARY, "xterm on the canvas", painted)
                print(f"\ncanvas: {summary}")

                # Focus the canvas (the pointer is then over the xterm), then type.
                left, top, width, height = await page.evaluate(
                    f"(r => [r.left, r.top, r.width, r.height])({CANVAS}.getBoundingClientRect())"
                )
                await page.click(left + width / 2, top + height / 2)
                await type_text(page, TYPED)
                received = b""
                while not received.endswith(b"\n"):
                    received += await typed.receive_some(100)
                assert received == b"typed-in-xterm\n"
                # ... and the xterm's answer reaches the canvas: more dark (text) pixels.
                await page.until(
                    CANVAS_SUMMARY,
                    "the typed line on the canvas",
                    lambda now: painted(now) and now["dark"] > summary["dark"],
                )

                shot = await page.call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))

                # Ctrl-C while the browser is still connected.
                pids = processes_of(run)
                os.killpg(demo.process.pid, signal.SIGINT)
                assert await demo.process.wait() == 0, demo.output()
            await demo.wait_for("received SIGINT")
            assert await all_gone(run) == {}, f"left after Ctrl-C (started: {pids})"
    print(f"screenshot of the demo in Chromium: {screenshot}")
    assert screenshot.stat().st_size > 1000


async def test_sigterm_to_the_bridge_stops_the_demo_desktop(nursery: trio.Nursery) -> None:
    run = uuid.uuid4().hex
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            demo, _, _ = await start_demo(stack, nursery, run)
            demo.process.send_signal(signal.SIGTERM)  # the bridge only, as systemd or kill do
            assert await demo.process.wait() == 0, demo.output()
            await demo.wait_for("received SIGTERM")
            assert await all_gone(run) == {}


# -- ./dev install ------------------------------------------------------------------------------

UNITS = DEV.parent / "systemd"
PREFIX = "/opt/trio-bridge"
COMMAND = "/usr/local/bin/trio-bridge"  # the units' ExecStart=


def test_dev_install_into_a_root(tmp_path: Path) -> None:
    """`ROOT=DIR ./dev install` lays out what `./dev install` puts in /: a venv in
    /opt/trio-bridge with the systemd extra, /usr/local/bin/trio-bridge linking to it (what
    the units run), the units, the docs --help names, a configuration; systemd-analyze
    accepts the installed units (without a running systemd)."""
    root = tmp_path / "root"
    env = {**os.environ, "ROOT": str(root)}
    done = subprocess.run(
        [str(DEV), "install"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"installed in {root}{PREFIX}" in done.stdout

    # The command the units run resolves, inside the root, to the venv's, which works.
    link = root / COMMAND.lstrip("/")
    assert os.readlink(link) == f"{PREFIX}/bin/trio-bridge"
    program = root / PREFIX.lstrip("/") / "bin" / "trio-bridge"
    version = subprocess.run([program, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("trio-bridge ")
    python = root / PREFIX.lstrip("/") / "bin" / "python"
    subprocess.run([python, "-c", "import systemd.daemon"], check=True)  # the [systemd] extra
    assert not Path(os.path.realpath(python)).is_relative_to("/root")  # ProtectHome= hides it

    installed = root / "etc" / "systemd" / "system"
    for unit in UNITS.iterdir():
        assert (installed / unit.name).read_text() == unit.read_text()
    assert f"ExecStart={COMMAND} " in (installed / "trio-bridge.service").read_text()
    config = (root / "etc" / "trio-bridge" / "trio-bridge.conf").read_text()
    assert "TARGET=localhost:5900\n" in config
    docs = root / PREFIX.lstrip("/") / "share" / "doc" / "trio-bridge" / "docs"
    assert (docs / "recording-format.md").is_file()  # --help points there

    # systemd-analyze verify insists that ExecStart= exists: point it at the program in the
    # root (the link's target, /opt/trio-bridge/..., is outside it).
    check = tmp_path / "verify"
    check.mkdir()
    for unit in installed.iterdir():
        (check / unit.name).write_text(unit.read_text().replace(COMMAND, str(program)))
    names = ["trio-bridge.socket", "trio-bridge.service", "trio-bridge@6081.socket"]
    names += ["trio-bridge@6081.service", "trio-bridge-accept.socket"]
    names += ["trio-bridge-accept@1.service"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(check / name) for name in names)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    # Installing again keeps an edited configuration.
    edited = root / "etc" / "trio-bridge" / "trio-bridge.conf"
    edited.write_text("TARGET=vnc:5901\n")
    again = subprocess.run([str(DEV), "install"], env=env, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert edited.read_text() == "TARGET=vnc:5901\n"
