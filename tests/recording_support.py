"""Helpers shared by the recording and replay tests (no tests here).

A *scripted session* is a fixed conversation between a websockets client and a small
VNC-like target (it greets first, then answers every chunk), relayed by a recording
bridge: it has every frame kind the recorder must keep, a fragmented message and a
message larger than the relay's 64 KiB reads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from trio_bridge import TcpAddress
from trio_bridge.pytest_plugin import StartBridge

GREETING = b"RFB 003.008\n"
BIG = bytes(range(256)) * 800  # 200 KiB: more than one relay read
FRAGMENTS = [b"frag1-", b"frag2-", b"frag3"]
CLOSE_CODE, CLOSE_REASON = 4000, "bye"

Transform = Callable[[bytes], bytes]


def scripted_target(
    greeting: bytes = GREETING, transform: Transform = bytes
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A target that greets, then answers each chunk with ``transform(chunk)``."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(greeting)
            async for chunk in stream:
                # SocketStream.receive_some returns bytes (its __anext__ says bytes | bytearray)
                await stream.send_all(transform(cast(bytes, chunk)))
        except trio.BrokenResourceError:
            pass

    return handler


async def start_tcp_target(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> TcpAddress:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return TcpAddress("127.0.0.1", listeners[0].socket.getsockname()[1])


async def receive_bytes(ws: ClientConnection, count: int) -> bytes:
    """Read data messages until ``count`` bytes arrived (the relay may split or join)."""
    got = b""
    while len(got) < count:
        message = await ws.recv()
        got += message if isinstance(message, bytes) else message.encode()
    return got


@dataclass(frozen=True)
class Step:
    """What the scripted client sends, and the bytes that come back."""

    message: bytes | str | list[bytes]
    answer: bytes


SCRIPT = [
    Step(GREETING, GREETING),
    Step("hello text", b"hello text"),
    Step(FRAGMENTS, b"".join(FRAGMENTS)),
    Step(BIG, BIG),
]


async def run_scripted_client(url: str) -> None:
    """The recorded conversation, checking every answer on the way."""
    async with connect(
        url, subprotocols=[Subprotocol("binary")], ping_interval=None, max_size=None
    ) as ws:
        assert await receive_bytes(ws, len(GREETING)) == GREETING
        for step in SCRIPT:
            await ws.send(step.message)
            assert await receive_bytes(ws, len(step.answer)) == step.answer
        pong = await ws.ping(b"are you there")
        await pong.wait()
        await ws.aclose(CLOSE_CODE, CLOSE_REASON)


async def record_scripted_session(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, folder: Path
) -> Path:
    """Relay the scripted session through a recording bridge; the finished file."""
    target = await start_tcp_target(nursery, scripted_target())
    running = await start_ws_bridge(target, record=folder)
    await run_scripted_client(running.url)
    (path,) = await running.recordings(1)
    return path


# -- a bridge in a subprocess (kill -9, resource limits) -------------------------------------


def bridge_command(record: Path, target: TcpAddress) -> list[str]:
    code = "import sys; from trio_bridge.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "--record", str(record), "127.0.0.1:0", str(target)]


_LISTENING = re.compile(rb"listening on \S+?:(\d+)")


class ProcessLog:
    """A subprocess's stderr, read by :meth:`pump` (run it as a task) so the pipe never
    fills, and searchable as it grows."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.text = bytearray()
        self.ended = False
        self._changed = trio.Event()

    async def pump(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.text += chunk
            self._notify()
        self.ended = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        while (match := pattern.search(self.text)) is None:
            if self.ended:
                raise AssertionError(f"not in the bridge's log:\n{self.text.decode()}")
            await self._changed.wait()
        return match

    async def until_closed(self) -> str:
        """Everything the process wrote to stderr, once it has exited (bounded wait)."""
        with trio.move_on_after(5):
            while not self.ended:
                await self._changed.wait()
        return self.text.decode(errors="replace")

    async def port(self) -> int:
        """The port the bridge bound, from its "listening on" line."""
        return int((await self.wait_for(_LISTENING)).group(1))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env.pop("STATE_DIRECTORY", None)
    return env


async def start_logged(
    nursery: trio.Nursery, command: list[str], **options: Any
) -> ProcessLog:
    """Start ``command`` (environment: :func:`subprocess_env`) with its stderr read into a
    :class:`ProcessLog` that ``nursery`` pumps; ``options`` go to ``open_process``."""
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, env=subprocess_env(), **options
    )
    log = ProcessLog(process)
    nursery.start_soon(log.pump)
    return log


def run_replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``trio-bridge-replay ARGS`` in a subprocess (for commands needing no live peer)."""
    code = "import sys; from trio_bridge.replay.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30
    )
