"""``drive``: play a recording's client side against a live server and compare.

Two ways in:

- ``target`` (HOST:PORT): straight to the TCP service the bridge relayed to; the
  recorded client messages are sent as raw bytes.
- ``url`` (ws://...): through a WebSocket server (a bridge, or the real thing); the
  recorded client frames are sent as frames (same kinds, same fragmentation).

Either way the server's answer is compared with the recorded target->client data as one
byte stream: TCP keeps no message boundaries and a bridge cuts its frames wherever its
reads happened to end, so boundaries are not the server's behaviour, bytes are.

Pacing: before each recorded client message, the driver waits until the server has
sent at least as much as the recorded client had seen at that moment (the recording's
causality), then keeps the recorded time since the previous sync point unless
``delay=False``. The session then ends the way the recorded one did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
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
from .preview import hexdump
from .wsio import FrameSender, close_payload

log = logging.getLogger("trio_bridge.replay")

MAX_DIVERGENCES = 5
CONTEXT = 16


@dataclass(frozen=True)
class Divergence:
    """Where the received stream first differs from the recorded one, in a run of bytes."""

    offset: int  # byte offset in the target->client stream
    expected: bytes
    got: bytes
    recorded_at_us: int  # time of the recorded frame holding the expected byte
    record_offset: int  # file offset of that frame's record

    def lines(self) -> list[str]:
        where = (
            f"@@ target->client byte {self.offset} (recorded at "
            f"{self.recorded_at_us / 1e6:.3f} s, record at file offset {self.record_offset}) @@"
        )
        lines = [where]
        lines += hexdump(self.expected, self.offset, "- ")
        lines += hexdump(self.got, self.offset, "+ ") if self.got else ["+ (nothing)"]
        return lines


class StreamComparison:
    """Compares received bytes, as they arrive, with a recording's target->client data."""

    def __init__(self, expected: Iterator[FrameRecord]) -> None:
        self._expected = expected
        self._current: FrameRecord | None = None
        self._position = 0  # within the current frame's payload
        self.compared = 0  # bytes received and compared so far
        self.divergences: list[Divergence] = []
        self.more_divergences = False
        self.extra = b""  # the first bytes received beyond the recording
        self.extra_count = 0
        self._in_divergence = False
        self._received = trio.Event()

    def _next_expected(self) -> FrameRecord | None:
        while self._current is None or self._position >= len(self._current.payload):
            self._current = next(self._expected, None)
            self._position = 0
            if self._current is None:
                return None
        return self._current

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            frame = self._next_expected()
            if frame is None:
                if not self.extra_count:
                    self.extra = bytes(view[:CONTEXT])
                self.extra_count += len(view)
                break
            n = min(len(view), len(frame.payload) - self._position)
            expected = frame.payload[self._position : self._position + n]
            got = view[:n]
            if expected == got:
                self._in_divergence = False
            else:
                self._scan(frame, expected, bytes(got))
            self._position += n
            self.compared += n
            view = view[n:]
        self._received.set()
        self._received = trio.Event()

    def _scan(self, frame: FrameRecord, expected: bytes, got: bytes) -> None:
        """Record each run of differing bytes (only the first few are kept)."""
        if len(self.divergences) >= MAX_DIVERGENCES:
            self.more_divergences = True
            return
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            if a == b:
                self._in_divergence = False
                continue
            if self._in_divergence:
                continue
            self._in_divergence = True
            if len(self.divergences) >= MAX_DIVERGENCES:
                self.more_divergences = True
                return
            self.divergences.append(
                Divergence(
                    offset=self.compared + i,
                    expected=expected[i : i + CONTEXT],
                    got=got[i : i + CONTEXT],
                    recorded_at_us=frame.time_us,
                    record_offset=frame.offset,
                )
            )

    def missing(self) -> tuple[int, Divergence | None]:
        """After the end: recorded bytes never received (count, and where they start)."""
        frame = self._next_expected()
        if frame is None:
            return 0, None
        rest = frame.payload[self._position :]
        first = Divergence(self.compared, rest[:CONTEXT], b"", frame.time_us, frame.offset)
        count = len(rest)
        self._current = None
        for more in self._expected:
            count += len(more.payload)
        return count, first

    async def wait_for(self, count: int) -> None:
        """Until ``count`` bytes have been received (the caller bounds the time)."""
        while self.compared + self.extra_count < count:
            await self._received.wait()


@dataclass
class DriveReport:
    """The outcome of one drive: matched, or the first divergences."""

    recording: str
    against: str
    sent_messages: int = 0
    expected_bytes: int = 0
    received_bytes: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    more_divergences: bool = False
    missing_bytes: int = 0
    missing_at: Divergence | None = None
    extra_bytes: int = 0
    extra_preview: bytes = b""
    close_problem: str = ""
    stalls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (
            self.error
            or self.divergences
            or self.more_divergences
            or self.missing_bytes
            or self.extra_bytes
            or self.close_problem
        )

    def lines(self) -> list[str]:
        lines = [
            f"--- {self.recording} (recorded target->client, {self.expected_bytes} bytes)",
            f"+++ {self.against} (received, {self.received_bytes} bytes)",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        for divergence in self.divergences:
            lines += divergence.lines()
        if self.more_divergences:
            lines.append(f"... more divergences after the first {len(self.divergences)}")
        if self.missing_at is not None:
            lines += self.missing_at.lines()
            lines.append(f"the server sent {self.missing_bytes} bytes fewer than the recording")
        if self.extra_bytes:
            lines.append(f"@@ {self.extra_bytes} bytes beyond the end of the recording @@")
            lines += hexdump(self.extra_preview, self.expected_bytes, "+ ")
        if self.close_problem:
            lines.append(f"close: {self.close_problem}")
        lines += [f"note: {note}" for note in self.stalls + self.notes]
        summary = "same as the recording" if self.ok else "DIFFERENT from the recording"
        lines.append(f"result: {summary} ({self.sent_messages} client messages sent)")
        return lines


class _CannotConnect(Exception):
    """The server could not be reached; the message says why, in one line."""


class _TcpConnection:
    """The TCP service itself: recorded client data goes as raw bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.eof = trio.Event()
        self.close_got: tuple[int | None, str] | None = None  # TCP has no close frame

    async def send(self, record: FrameRecord) -> bool:
        try:
            if record.kind is Kind.CLOSE:
                await self.stream.send_eof()
            elif record.is_data and record.payload:
                await self.stream.send_all(record.payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def receive_into(self, comparison: StreamComparison) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    break
                comparison.feed(data)
        finally:
            self.eof.set()


class _WsConnection:
    """A WebSocket server or bridge: recorded client frames go as frames."""

    def __init__(self, ws: ClientConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.sender = FrameSender(ws, nursery)
        self.eof = trio.Event()
        self.close_got: tuple[int | None, str] | None = None

    async def send(self, record: FrameRecord) -> bool:
        return await self.sender.send(record.kind, record.payload, record.fin)

    async def receive_into(self, comparison: StreamComparison) -> None:
        """Every data frame as it arrives, until the connection is closed."""
        try:
            while True:
                async for fragment in self.ws.recv_streaming(decode=False):
                    comparison.feed(fragment)
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
    on_progress: Callable[[int, float], None] | None = None,
) -> DriveReport:
    """Drive ``target`` or ``url`` with the recorded client side; see the module doc.

    ``timeout`` bounds each wait for the server (its answer, its close).
    """
    if (target is None) == (url is None):
        raise ValueError("give exactly one of target= and url=")
    path = Path(recording)
    with open_recording(path) as reader:
        meta = reader.meta
    report = DriveReport(str(path), url or str(target))
    with open_recording(path) as expected_reader:
        expected = (
            r
            for r in expected_reader
            if isinstance(r, FrameRecord) and r.direction is Direction.DOWN and r.is_data
        )
        comparison = StreamComparison(expected)
        async with AsyncExitStack() as stack:
            try:
                opened = await _open(stack, target, url, meta.subprotocol, timeout)
            except _CannotConnect as exc:
                report.error = str(exc)
                return report
            async with trio.open_nursery() as nursery:
                connection: _Connection = (
                    _WsConnection(opened, nursery)
                    if isinstance(opened, ClientConnection)
                    else _TcpConnection(opened)
                )
                nursery.start_soon(connection.receive_into, comparison)
                playback = _ClientPlayback(
                    connection, comparison, report, speed, delay, timeout, on_progress
                )
                await playback.play(path)
                nursery.cancel_scope.cancel()
            # What the recording did not close is cut, not closed with a handshake.
            await trio.aclose_forcefully(opened)
        report.received_bytes = comparison.compared + comparison.extra_count
        report.divergences = comparison.divergences
        report.more_divergences = comparison.more_divergences
        report.extra_bytes = comparison.extra_count
        report.extra_preview = comparison.extra
        report.missing_bytes, report.missing_at = comparison.missing()
        report.expected_bytes = comparison.compared + report.missing_bytes
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
    comparison: StreamComparison
    report: DriveReport
    speed: float
    delay: bool
    timeout: float
    on_progress: Callable[[int, float], None] | None
    # The live time of the recording's time 0; a sync point moves it later.
    anchor: float = field(init=False, default_factory=trio.current_time)
    seen_down: int = field(init=False, default=0)  # recorded target->client bytes so far
    recorded_close: tuple[int | None, str] | None = field(init=False, default=None)
    client_closed: bool = field(init=False, default=False)

    async def play(self, path: Path) -> None:
        with open_recording(path) as reader:
            for record in reader:
                if isinstance(record, GapRecord):
                    self.report.notes.append(
                        f"the recording has a gap at {record.time_us / 1e6:.3f} s "
                        f"({record.total_frames} frames lost: {record.reason}); "
                        "divergences after it may come from the recording"
                    )
                if not isinstance(record, FrameRecord) or record.kind is Kind.PONG:
                    continue  # pongs answered the recorded peer's pings; ours answer live ones
                if record.direction is Direction.DOWN:
                    self._follow_server(record)
                    continue
                if not await self._send(record):
                    break
                if self.on_progress is not None:
                    self.on_progress(reader.position, trio.current_time() - self.anchor)
        await self._wait_for_server(self.seen_down)
        await self._end_like_recording()

    def _follow_server(self, record: FrameRecord) -> None:
        """Count what the recorded client had received; keep the server's close, unless
        it answered the client's."""
        if record.is_data:
            self.seen_down += len(record.payload)
        elif record.kind is Kind.CLOSE and not self.client_closed:
            self.recorded_close = close_payload(record.payload)

    async def _send(self, record: FrameRecord) -> bool:
        """Send a recorded client frame when its time comes; False if the server closed."""
        seconds = record.time_us / 1e6
        await self._pace(seconds)
        if self.connection.eof.is_set() or not await self.connection.send(record):
            self.report.notes.append(
                f"the server closed the connection before the client message at {seconds:.3f} s"
            )
            return False
        if record.kind is Kind.CLOSE:
            self.client_closed = True
        elif record.is_data and record.fin:
            self.report.sent_messages += 1
        return True

    async def _pace(self, seconds: float) -> None:
        """Wait until the server has sent what the recorded client had received by then
        (after one such wait times out, no more), then until the recorded time."""
        if not self.report.stalls and not await self._wait_for_server(self.seen_down):
            self.report.stalls.append(
                f"before the client message at {seconds:.3f} s: waited {self.timeout:g} s "
                f"for the server's first {self.seen_down} bytes, got {self.comparison.compared}; "
                "later messages were sent without waiting"
            )
        # A server slower than recorded moves the anchor: the spacing after a sync point stays.
        self.anchor = max(self.anchor, trio.current_time() - seconds / self.speed)
        if self.delay:
            await trio.sleep_until(self.anchor + seconds / self.speed)

    async def _wait_for_server(self, count: int) -> bool:
        """True when the server has sent ``count`` bytes (False: timeout or it closed)."""
        comparison, eof = self.comparison, self.connection.eof
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:

                async def stop_at_eof() -> None:
                    await eof.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_at_eof)
                await comparison.wait_for(count)
                nursery.cancel_scope.cancel()
        return comparison.compared + comparison.extra_count >= count

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
