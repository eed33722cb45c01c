"""pytest fixtures for testing WebSocket clients and servers with trio-bridge.

Installed with the package (entry point ``pytest11: trio_bridge``), so a project that
depends on trio-bridge has them without any import. They are Trio fixtures: the test
suite needs pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio`` on each test).
Everything runs in-process on 127.0.0.1 ports chosen by the kernel, inside the test's
``nursery``, and stops when the test ends. See docs/pytest-plugin.md.

=========================  ===================================================================
fixture                    gives
=========================  ===================================================================
``tcp_echo_target``        a TCP echo server: its :class:`~trio_bridge.TcpAddress`
``start_ws_bridge``        ``await start_ws_bridge(target, record=None, **options)`` ->
                           :class:`RunningBridge` (``.url``, ``.port``, ``.bridge``, ...)
``ws_bridge_target``       the target ``ws_bridge_url`` relays to; override it in a conftest
                           (default: ``tcp_echo_target``)
``ws_bridge_url``          ``ws://127.0.0.1:PORT/`` of a bridge to ``ws_bridge_target``
``start_replay_server``    ``await start_replay_server(recording, **options)`` -> a running
                           :class:`~trio_bridge.replay.ReplayServer` (``.url``, ``.reports``)
``replay_recording``       the recording ``replay_server_url`` serves; override it
``replay_server_url``      ``ws://127.0.0.1:PORT/`` of a replay server for ``replay_recording``
``drive_recording``        ``await drive_recording(recording, target=... | url=..., compare=...)``
                           drives a server with a recorded client; fails the test with the
                           comparator's report when the server behaves otherwise
=========================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Union

import pytest

# pytest imports this module in every run wherever trio-bridge is installed, used or not:
# nothing heavier than pytest here. The bridge, the recorder and the replay server are
# imported by the fixtures that start them (tests/test_plugin_import.py checks).
if TYPE_CHECKING:
    from pathlib import Path

    import trio

    from .addresses import Address, TcpAddress
    from .config import Config
    from .recording import Recorder
    from .replay import Comparator, DriveReport, ReplayServer
    from .server import Bridge

TargetLike = Union["Address", tuple[str, int], str]  # a string: Union, not |


class RunningBridge:
    """A bridge serving on ``127.0.0.1:port`` for the rest of the test."""

    def __init__(self, bridge: Bridge, port: int, recorder: Recorder | None = None) -> None:
        self.bridge = bridge
        self.port = port
        self.recorder = recorder

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def recordings(self, count: int = 1) -> list[Path]:
        """Wait until ``count`` sessions are completely recorded; their files, in order."""
        if self.recorder is None:
            raise RuntimeError("this bridge was started without record=")
        return await self.recorder.wait_finished(count)


def _address(target: TargetLike | None) -> Address | None:
    """None: no fixed target, for a bridge that routes by token (``tokens=...``)."""
    from .addresses import TcpAddress, UnixAddress

    if target is None or isinstance(target, TcpAddress | UnixAddress):
        return target
    if isinstance(target, tuple):
        return TcpAddress(*target)
    host, _, port = target.rpartition(":")
    return TcpAddress(host.strip("[]"), int(port))


def _config(target: Address | None, options: dict[str, Any]) -> Config:
    """``Limits`` fields and ``Config`` fields may be mixed in one set of keywords."""
    from dataclasses import fields, replace

    from .config import Config, Limits

    limit_names = {f.name for f in fields(Limits)}
    limits = replace(Limits(), **{k: v for k, v in options.items() if k in limit_names})
    rest = {k: v for k, v in options.items() if k not in limit_names}
    return Config(target=target, limits=limits, **rest)


async def _echo(stream: trio.SocketStream) -> None:
    import trio

    try:
        async for chunk in stream:
            await stream.send_all(chunk)
    except trio.BrokenResourceError:
        pass


@pytest.fixture
async def tcp_echo_target(nursery: trio.Nursery) -> TcpAddress:
    """A TCP server on 127.0.0.1 that sends back everything it receives."""
    import trio

    from .addresses import TcpAddress

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, _echo, listeners)
    return TcpAddress("127.0.0.1", port)


StartBridge = Callable[..., Awaitable[RunningBridge]]


@pytest.fixture
async def start_ws_bridge(nursery: trio.Nursery) -> StartBridge:
    """``await start_ws_bridge(target, record=None, **options)``: a bridge on a free port.

    ``target``: a :class:`TcpAddress`/:class:`UnixAddress`, ``(host, port)`` or
    ``"host:port"``. ``record``: a folder to record every session in. ``options``: any
    :class:`~trio_bridge.Config` or :class:`~trio_bridge.Limits` field
    (``heartbeat=5``, ``max_message_size=1 << 16``, ``compression=True``, ...).
    """
    import socket

    from .recording import Recorder
    from .server import Bridge

    async def start(
        target: TargetLike | None, *, record: str | Path | None = None, **options: Any
    ) -> RunningBridge:
        config = _config(_address(target), options)
        recorder = None
        if record is not None:
            recorder = await nursery.start(Recorder(record).run)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)  # a test may open thousands of sessions at once
        port = listener.getsockname()[1]
        bridge: Bridge = await nursery.start(Bridge(config, observers=recorder).serve, [listener])
        return RunningBridge(bridge, port, recorder)

    return start


@pytest.fixture
def ws_bridge_target(tcp_echo_target: TcpAddress) -> TargetLike:
    """What ``ws_bridge_url`` relays to; override in a conftest.py for your own service."""
    return tcp_echo_target


@pytest.fixture
async def ws_bridge_url(start_ws_bridge: StartBridge, ws_bridge_target: TargetLike) -> str:
    """The ws:// URL of a bridge to ``ws_bridge_target`` (an echo server by default)."""
    running = await start_ws_bridge(ws_bridge_target)
    return running.url


StartReplay = Callable[..., Awaitable["ReplayServer"]]


@pytest.fixture
async def start_replay_server(nursery: trio.Nursery) -> StartReplay:
    """``await start_replay_server(recording, **options)``: a running replay server.

    ``options`` are :class:`~trio_bridge.replay.ReplayServer`'s: ``speed=``,
    ``delay=False``, ``lockstep=True``, ... Its ``reports`` (and ``await
    server.wait_reports(n)``) tell whether the client sent what the recording has.
    """
    from .replay import ReplayServer

    async def start(recording: str | Path, **options: Any) -> ReplayServer:
        server = ReplayServer(recording, **options)
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
def replay_recording() -> Path:
    """The recording ``replay_server_url`` serves: override this fixture to name yours."""
    pytest.fail(
        "replay_server_url needs a recording: define a `replay_recording` fixture "
        "returning its path (see docs/pytest-plugin.md)",
        pytrace=False,
    )


@pytest.fixture
async def replay_server_url(start_replay_server: StartReplay, replay_recording: Path) -> str:
    """The ws:// URL of a replay server playing ``replay_recording``'s target side."""
    server = await start_replay_server(replay_recording)
    return server.url


DriveRecording = Callable[..., Awaitable["DriveReport"]]


@pytest.fixture
def drive_recording() -> DriveRecording:
    """``await drive_recording(recording, *, target=None, url=None, compare="bytes",
    images=None, **options)``: a regression test for a server.

    The recorded client side is played against ``target`` (a TCP service: a
    :class:`TcpAddress`, ``(host, port)`` or ``"host:port"``) or ``url`` (ws://, through a
    bridge), and what the server sends is compared with the recording by ``compare``:
    ``"bytes"``, ``"messages"``, ``"lengths"``, ``"none"``, ``"rfb"`` (VNC: what the screen
    shows) or a :class:`~trio_bridge.replay.Comparator`. ``images``: with ``"rfb"``, a
    folder for expected/actual/diff PNGs of a differing screen. ``options`` are
    :func:`~trio_bridge.replay.drive`'s (``delay=False``, ``speed=``, ``timeout=``).
    The test fails with the report when the server differs; otherwise the
    :class:`~trio_bridge.replay.DriveReport` is returned.
    """
    from .replay import drive, make_comparator

    async def run(
        recording: str | Path,
        *,
        target: TargetLike | None = None,
        url: str | None = None,
        compare: str | Comparator = "bytes",
        images: str | Path | None = None,
        **options: Any,
    ) -> DriveReport:
        from pathlib import Path

        comparator = make_comparator(compare)
        if images is not None:
            from .replay.rfb import RfbComparator

            if not isinstance(comparator, RfbComparator):
                raise TypeError("images= needs compare='rfb'")
            comparator.images = Path(images)
        from .addresses import TcpAddress

        address = _address(target) if target is not None else None
        if address is not None and not isinstance(address, TcpAddress):
            raise TypeError("drive_recording drives TCP targets (or a url=)")
        report = await drive(recording, target=address, url=url, compare=comparator, **options)
        if not report.ok:
            pytest.fail("\n".join(report.lines()), pytrace=False)
        return report

    return run
