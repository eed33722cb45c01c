"""``drive``: play a recording's client side against a live server and compare.

Two ways in:

- ``target`` (HOST:PORT): straight to the TCP service the bridge relayed to; the
  recorded client messages are sent as raw bytes.
- ``url`` (ws://...): through a WebSocket server (a bridge, or the real thing); the
  recorded client frames are sent as frames (same kinds, same fragmentation).

What the server sends is handed to a comparator (replay/compare.py, replay/rfb.py),
which aligns it with what the recorded server sent, as diff(1) aligns lines, and
reports each divergence once.

Pacing: before each recorded client message, the driver waits until the comparator
says the server has caught up with the recording at that moment (by default: sent as
many bytes as the recorded client had received; for RFB: reached the same protocol
step), then keeps the recorded time since the previous sync point unless
``delay=False``. The session then ends the way the recorded one did.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from ..config import TcpAddress
from ..observe import Direction
from ..recording import FrameRecord, GapRecord, Kind, open_recording
from .compare import STREAM_MODES, Comparator, Finding, StreamComparator
from .messages import Message, MessageAssembler, describe_gap
from .wsio import FrameSender, close_payload

log = logging.getLogger("trio_bridge.replay")


def make_comparator(compare: str | Comparator) -> Comparator:
    """A comparator by name (``bytes``, ``messages``, ``lengths``, ``none``, ``rfb``), or
    ``MODULE:NAME``, a callable in an importable module that returns one; an object is
    returned as it is."""
    if not isinstance(compare, str):
        return compare
    if compare in STREAM_MODES:
        return StreamComparator(compare)
    if compare == "rfb":
        from .rfb import RfbComparator

        return RfbComparator()
    module_name, _, name = compare.partition(":")
    if not name:
        raise ValueError(
            f"unknown comparator {compare!r}: use one of {', '.join(COMPARATOR_NAMES)} "
            "or MODULE:NAME"
        )
    factory = getattr(importlib.import_module(module_name), name)
    comparator: Comparator = factory()
    return comparator


COMPARATOR_NAMES = (*STREAM_MODES, "rfb")


@dataclass
class DriveReport:
    """The outcome of one drive: matched, or what differs."""

    recording: str
    against: str
    compare: str = "bytes"
    sent_messages: int = 0
    expected_bytes: int = 0
    received_bytes: int = 0
    findings: list[Finding] = field(default_factory=list)
    close_problem: str = ""
    stalls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (self.error or self.findings or self.close_problem)

    def lines(self) -> list[str]:
        lines = [
            f"--- {self.recording} (recorded target->client, {self.expected_bytes} bytes)",
            f"+++ {self.against} (received, {self.received_bytes} bytes; compared: {self.compare})",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        for finding in self.findings:
            lines += finding.lines()
        if self.close_problem:
            lines.append(f"close: {self.close_problem}")
        lines += [f"note: {note}" for note in self.stalls + self.notes]
        summary = "same as the recording" if self.ok else "DIFFERENT from the recording"
        lines.append(f"result: {summary} ({self.sent_messages} client messages sent)")
        return lines


class _Received:
    """What the live server sends, numbered and stamped, handed to the comparator; the
    players wait on it."""

    def __init__(self, comparator: Comparator) -> None:
        self.comparator = comparator
        self.started = trio.current_time()
        self.count = 0
        self.bytes = 0
        self._changed = trio.Event()

    def feed(self, data: bytes, text: bool = False) -> None:
        self.count += 1
        at_us = int((trio.current_time() - self.started) * 1e6)
        self.comparator.receive(Message(self.count, text, data, at_us, self.bytes))
        self.bytes += len(data)
        self._changed.set()
        self._changed = trio.Event()

    async def caught_up(self) -> None:
        """Until the comparator says the live server has caught up (the caller bounds it)."""
        while not self.comparator.caught_up():
            await self._changed.wait()


class _CannotConnect(Exception):
    """The server could not be reached; the message says why, in one line."""


class _TcpConnection:
    """The TCP service itself: recorded client data goes as raw bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.eof = trio.Event()
        self.close_got: tuple[int | None, str] | None = None  # TCP has no close frame

    async def send(self, record: FrameRecord, payload: bytes) -> bool:
        try:
            if record.kind is Kind.CLOSE:
                await self.stream.send_eof()
            elif record.is_data and payload:
                await self.stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def receive_into(self, received: _Received) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    break
                received.feed(data)
        finally:
            self.eof.set()


class _WsConnection:
    """A WebSocket server or bridge: recorded client frames go as frames."""

    def __init__(self, ws: ClientConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.sender = FrameSender(ws, nursery)
        self.eof = trio.Event()
        self.close_got: tuple[int | None, str] | None = None

    async def send(self, record: FrameRecord, payload: bytes) -> bool:
        return await self.sender.send(record.kind, payload, record.fin)

    async def receive_into(self, received: _Received) -> None:
        """Every message as it arrives, until the connection is closed."""
        try:
            while True:
                data = await self.ws.recv()
                if isinstance(data, str):
                    received.feed(data.encode(), text=True)
                else:
                    received.feed(data)
        except ConnectionClosed:
            code, reason = self.ws.close_code, self.ws.close_reason or ""
            if code is not None and code != 1006:  # 1006: no close frame came
                self.close_got = (None if code == 1005 else code), reason
        finally:
            self.eof.set()


_Connection = _TcpConnection | _WsConnection


async def drive(
    recording: str | Path,
    *,
    target: TcpAddress | None = None,
    url: str | None = None,
    speed: float = 1.0,
    delay: bool = True,
    timeout: float = 10.0,
    compare: str | Comparator = "bytes",
    on_progress: Callable[[int, float], None] | None = None,
) -> DriveReport:
    """Drive ``target`` or ``url`` with the recorded client side; see the module doc.

    ``timeout`` bounds each wait for the server (its answer, its close). ``compare``
    names a comparator (see :func:`make_comparator`) or is one.
    """
    if (target is None) == (url is None):
        raise ValueError("give exactly one of target= and url=")
    path = Path(recording)
    comparator = make_comparator(compare)
    with open_recording(path) as reader:
        meta = reader.meta
    report = DriveReport(str(path), url or str(target), comparator.name)
    async with AsyncExitStack() as stack:
        try:
            opened = await _open(stack, target, url, meta.subprotocol, timeout)
        except _CannotConnect as exc:
            report.error = str(exc)
            return report
        received = _Received(comparator)
        async with trio.open_nursery() as nursery:
            connection: _Connection = (
                _WsConnection(opened, nursery)
                if isinstance(opened, ClientConnection)
                else _TcpConnection(opened)
            )
            nursery.start_soon(connection.receive_into, received)
            playback = _ClientPlayback(
                connection, received, report, speed, delay, timeout, on_progress
            )
            await playback.play(path)
            nursery.cancel_scope.cancel()
        # What the recording did not close is cut, not closed with a handshake.
        await trio.aclose_forcefully(opened)
    report.received_bytes = received.bytes
    report.findings = comparator.findings()
    report.notes += getattr(comparator, "notes", [])  # optional: what it could not compare
    return report


async def _open(
    stack: AsyncExitStack,
    target: TcpAddress | None,
    url: str | None,
    subprotocol: str | None,
    timeout: float,
) -> ClientConnection | trio.SocketStream:
    """Connect, to be closed by ``stack``; :class:`_CannotConnect` says why not."""
    if url is None:
        assert target is not None
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(target.host, target.port)
        except (OSError, trio.TooSlowError) as exc:
            raise _CannotConnect(f"cannot connect to {target}: {exc or 'timed out'}") from None
        stack.push_async_callback(trio.aclose_forcefully, stream)
        return stream
    try:
        client = connect(
            url,
            subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
            compression=None,  # the recorded frames go out as recorded
            proxy=None,
            open_timeout=timeout,
            ping_interval=None,  # no frame the recording does not have
            close_timeout=timeout,
            max_size=None,
            logger=log,
        )
        return await stack.enter_async_context(client)
    except InvalidURI as exc:
        raise _CannotConnect(str(exc)) from None
    except OSError as exc:
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'wss' else 80)}"
        raise _CannotConnect(f"cannot connect to {where}: {exc.strerror or exc}") from None
    except TimeoutError:
        raise _CannotConnect(f"no WebSocket handshake with {url} within {timeout:g} s") from None
    except InvalidHandshake as exc:
        raise _CannotConnect(f"{url} refused the WebSocket: {exc}") from None


@dataclass
class _ClientPlayback:
    """Sends the recorded client side in the recording's order of cause and effect, and
    in its time; the report gets the stalls, the notes and how the session ended."""

    connection: _Connection
    received: _Received
    report: DriveReport
    speed: float
    delay: bool
    timeout: float
    on_progress: Callable[[int, float], None] | None
    # The live time of the recording's time 0; a sync point moves it later.
    anchor: float = field(init=False, default_factory=trio.current_time)
    server: MessageAssembler = field(init=False, default_factory=MessageAssembler)
    recorded_close: tuple[int | None, str] | None = field(init=False, default=None)
    client_closed: bool = field(init=False, default=False)

    async def play(self, path: Path) -> None:
        with open_recording(path) as reader:
            for record in reader:
                if isinstance(record, GapRecord):
                    self.report.notes.append(describe_gap(record))
                if not isinstance(record, FrameRecord) or record.kind is Kind.PONG:
                    continue  # pongs answered the recorded peer's pings; ours answer live ones
                if record.direction is Direction.DOWN:
                    self._follow_server(record)
                    continue
                if not await self._send(record):
                    break
                if self.on_progress is not None:
                    self.on_progress(reader.position, trio.current_time() - self.anchor)
        await self._wait_for_server()
        await self._end_like_recording()

    def _follow_server(self, record: FrameRecord) -> None:
        """Tell the comparator what the recorded client had received; keep the server's
        close, unless it answered the client's."""
        if record.is_data:
            message = self.server.feed(
                record.kind, record.fin, record.payload, record.time_us, record.offset
            )
            if message is not None:
                self.received.comparator.expect(message)
                self.report.expected_bytes += len(message.payload)
        elif record.kind is Kind.CLOSE and not self.client_closed:
            self.recorded_close = close_payload(record.payload)

    async def _send(self, record: FrameRecord) -> bool:
        """Send a recorded client frame when its time comes; False if the server closed."""
        seconds = record.time_us / 1e6
        await self._pace(seconds, closing=record.kind is Kind.CLOSE)
        payload = record.payload
        if record.is_data:
            payload = self.received.comparator.client_sends(payload)
        if self.connection.eof.is_set() or not await self.connection.send(record, payload):
            self.report.notes.append(
                f"the server closed the connection before the client message at {seconds:.3f} s"
            )
            return False
        if record.kind is Kind.CLOSE:
            self.client_closed = True
        elif record.is_data and record.fin:
            self.report.sent_messages += 1
        return True

    async def _pace(self, seconds: float, closing: bool = False) -> None:
        """Wait until the server has caught up with what the recorded client had received
        by then (after one such wait times out, no more, except before the close, which
        would cut the server off), then until the recorded time."""
        if self.report.stalls and closing:
            await self._wait_for_server()
        elif not self.report.stalls and not await self._wait_for_server():
            self.report.stalls.append(
                f"before the client message at {seconds:.3f} s: waited {self.timeout:g} s "
                f"for the server's answer to what came before (recorded: "
                f"{self.report.expected_bytes} bytes so far, got {self.received.bytes}); "
                "later messages were sent without waiting"
            )
        # A server slower than recorded moves the anchor: the spacing after a sync point stays.
        self.anchor = max(self.anchor, trio.current_time() - seconds / self.speed)
        if self.delay:
            await trio.sleep_until(self.anchor + seconds / self.speed)

    async def _wait_for_server(self) -> bool:
        """True when the server has caught up with the recording, a sync point (False:
        timeout, or it closed)."""
        received, eof = self.received, self.connection.eof
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:

                async def stop_at_eof() -> None:
                    await eof.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_at_eof)
                await received.caught_up()
                nursery.cancel_scope.cancel()
        caught_up: bool = received.comparator.caught_up()
        if caught_up:
            received.comparator.sync()
        return caught_up

    async def _end_like_recording(self) -> None:
        """Let the session end as the recorded one did, and compare how it ended."""
        connection, recorded, timeout = self.connection, self.recorded_close, self.timeout
        if self.client_closed:
            with trio.move_on_after(timeout):
                await connection.eof.wait()
            return
        if recorded is None:
            return  # the recording stops mid-session: nothing to compare
        with trio.move_on_after(timeout):
            await connection.eof.wait()
        if not connection.eof.is_set():
            self.report.close_problem = (
                f"the server did not close within {timeout:g} s; in the recording it closed "
                f"with {_describe_close(recorded)}"
            )
            return
        if isinstance(connection, _WsConnection):
            got = connection.close_got
            if got is None or got[0] != recorded[0]:
                got_text = _describe_close(got) if got is not None else "no close frame"
                self.report.close_problem = f"recorded {_describe_close(recorded)}, got {got_text}"
            elif got[1] != recorded[1]:
                self.report.notes.append(
                    f"same close code, another reason: recorded {recorded[1]!r}, got {got[1]!r}"
                )


def _describe_close(close: tuple[int | None, str]) -> str:
    code, reason = close
    return f"close {code if code is not None else '(no code)'} {reason!r}"
