"""``serve``: play a recording's target side to WebSocket clients.

For each connecting client, after the handshake, the recorded target->client frames
are sent with the recorded timing (scaled by ``speed``, or none with ``delay=False``);
with ``lockstep`` the player also waits, wherever the recorded client sent a message,
until the live client has sent its message too, and keeps the recorded spacing from
there. Meanwhile every message the client sends is compared with the recording's, in
order, and the differences are reported.

The recording is streamed twice (one reader plays, one compares), never loaded, so a
long recording costs no memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.trio.server import ServerConnection
from websockets.trio.server import serve as serve_websocket
from websockets.typing import Subprotocol

from ..observe import Direction
from ..recording import FrameRecord, GapRecord, Kind, open_recording
from .compare import Divergence, align, message_key
from .control import PlaybackControl
from .messages import Message, MessageAssembler, describe_gap, recorded_messages
from .preview import describe_payload
from .wsio import FrameSender

log = logging.getLogger("trio_bridge.replay")

MAX_LISTED_DIFFERENCES = 20
WAIT_NOTICE = 1.0  # seconds of a lockstep wait before on_wait says what it waits for


@dataclass
class ServeReport:
    """What happened with one client."""

    client: str
    sent_frames: int = 0
    client_messages: int = 0
    matched: int = 0
    expected_messages: int = 0
    differences: list[Divergence] = field(default_factory=list)
    more_differences: int = 0
    played_to_end: bool = False
    note: str = ""  # why the play stopped early, or how the recording ends
    notes: list[str] = field(default_factory=list)  # gaps, lockstep waits that timed out

    @property
    def ok(self) -> bool:
        return self.played_to_end and not self.differences and not self.more_differences

    def lines(self) -> list[str]:
        head = (
            f"client {self.client}: sent {self.sent_frames} recorded frames; "
            f"{self.matched} of {self.expected_messages} recorded client messages matched "
            f"({self.client_messages} received)"
        )
        lines = [head + (f"; {self.note}" if self.note else "")]
        for difference in self.differences:
            lines += difference.lines()
        if self.more_differences:
            lines.append(f"... and {self.more_differences} more differences")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"client {self.client}: {'OK' if self.ok else 'DIFFERENT'}")
        return lines


class _ClientProgress:
    """How many messages the live client has sent; the lockstep player waits on it."""

    def __init__(self) -> None:
        self.count = 0
        self.closed = trio.Event()  # the connection is over: no more messages will come
        self._changed = trio.Event()

    def advance(self) -> None:
        self.count += 1
        self._notify()

    def finish(self) -> None:
        self.closed.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> bool:
        """True once ``count`` messages arrived; False if the connection ended first."""
        while self.count < count:
            if self.closed.is_set():
                return False
            await self._changed.wait()
        return True


class ReplayServer:
    """Serves one recording to every client that connects (one at a time or many)."""

    def __init__(
        self,
        recording: str | Path,
        *,
        speed: float = 1.0,
        delay: bool = True,
        lockstep: bool = False,
        lockstep_timeout: float = 30.0,
        close_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        on_report: Callable[[ServeReport], None] | None = None,
        on_progress: Callable[[str, int, float], None] | None = None,
        on_wait: Callable[[str, str], None] | None = None,
        web: str | Path | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be greater than 0")
        self.recording = Path(recording)
        with open_recording(self.recording) as reader:  # fail now on a bad file
            self.meta = reader.meta
        self.control = PlaybackControl(speed)
        self.delay = delay
        self.lockstep = lockstep
        self.lockstep_timeout = lockstep_timeout
        self.close_timeout = close_timeout
        self.handshake_timeout = handshake_timeout
        self.on_report = on_report
        self.on_progress = on_progress
        self.on_wait = on_wait  # (client, what it waits for), after WAIT_NOTICE s in lockstep
        self.web = Path(web) if web is not None else None  # serve --web: files and controls
        self.reports: list[ServeReport] = []
        self.port = 0
        self._report_added = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def page_url(self) -> str:
        """With ``web``: the page to open (the client and the replay's controls)."""
        return f"http://127.0.0.1:{self.port}/replay.html"

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        once: bool = False,
        task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: a free port, see :attr:`port`) and serve clients."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, once=once, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        once: bool = False,
        task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve clients on ``listeners``; with ``once``, return after the first session
        (clients connecting meanwhile are refused with close code 1013, try again later).
        Only a completed WebSocket handshake counts: a probe, a plain HTTP request or a
        failed handshake is logged and the server keeps waiting."""
        self.port = listeners[0].socket.getsockname()[1]
        first_taken, first_done = trio.Event(), trio.Event()

        async def handler(ws: ServerConnection) -> None:
            if once and first_taken.is_set():
                await ws.aclose(1013, "this replay serves one client (--once)")
                return
            first_taken.set()
            try:
                await self.handle(ws)
            finally:
                first_done.set()

        def refused(ws: ServerConnection, request: Request, response: Response) -> None:
            # A failed WebSocket handshake is logged; --web's pages and files are not.
            if response.status_code != 101 and "Upgrade" in request.headers:
                host, port = ws.remote_address[:2]
                status = f"HTTP {response.status_code} {response.reason_phrase}"
                log.warning("client %s:%s: refused the handshake with %s", host, port, status)

        process_request = None
        if self.web is not None:
            from .web import WebFiles  # only serve --web needs it

            meta = self.meta
            title = f"session {meta.session_id} ({meta.client} -> {meta.target})"
            process_request = WebFiles(self.web, self.control, title).process_request
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_websocket,
                    handler,
                    listeners=listeners,
                    process_request=process_request,
                    select_subprotocol=self._select_subprotocol,
                    process_response=refused,
                    compression=None,  # the recorded frames go out as recorded
                    open_timeout=self.handshake_timeout,
                    ping_interval=None,  # no frame the recording does not have
                    close_timeout=self.close_timeout,
                    max_size=None,
                    logger=log,
                )
            )
            task_status.started(self)
            if once:
                await first_done.wait()
                nursery.cancel_scope.cancel()

    def _select_subprotocol(
        self, ws: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        wanted = self.meta.subprotocol
        return Subprotocol(wanted) if wanted is not None and wanted in offered else None

    async def wait_reports(self, count: int) -> list[ServeReport]:
        while len(self.reports) < count:
            await self._report_added.wait()
            self._report_added = trio.Event()
        return self.reports[:count]

    async def handle(self, ws: ServerConnection) -> ServeReport:
        """Serve one client, from its open WebSocket to the end; returns its report."""
        host, port = ws.remote_address[:2]
        report = ServeReport(f"{host}:{port}")
        progress = _ClientProgress()
        async with trio.open_nursery() as nursery:
            sender = FrameSender(ws, nursery)
            nursery.start_soon(self._compare, ws, report, progress)
            playback = _Playback(self, sender, report, progress)
            await playback.play()
            await playback.finish()
            nursery.cancel_scope.deadline = trio.current_time() + self.close_timeout
        self.reports.append(report)
        self._report_added.set()
        if self.on_report is not None:
            self.on_report(report)
        return report

    # -- comparing the client's side ------------------------------------------------------

    async def _compare(
        self, ws: ServerConnection, report: ServeReport, progress: _ClientProgress
    ) -> None:
        """Collect the client's messages; at the end align them with the recorded ones."""
        got: list[Message] = []
        started = trio.current_time()
        try:
            while True:
                try:
                    data = await ws.recv()
                except ConnectionClosed:
                    break
                payload = data.encode() if isinstance(data, str) else data
                at_us = int((trio.current_time() - started) * 1e6)
                got.append(Message(len(got) + 1, isinstance(data, str), payload, at_us))
                report.client_messages += 1
                progress.advance()
        finally:
            progress.finish()
        with open_recording(self.recording) as reader:
            expected = list(recorded_messages(reader, Direction.UP))
        report.expected_messages = len(expected)
        report.matched, differences = align(
            expected, got, message_key, "client->target", joined_equal_is_same=False
        )
        report.differences = differences[:MAX_LISTED_DIFFERENCES]
        report.more_differences = len(differences) - len(report.differences)


# -- playing the target's side ------------------------------------------------------------


@dataclass
class _Playback:
    """One client's play of the recorded target side: in time, and in step with the
    live client when the server is in lockstep. The report says how far it got."""

    server: ReplayServer
    sender: FrameSender
    report: ServeReport
    progress: _ClientProgress
    # The live time of the recording's time 0 at ``speed``; a sync, a pause or another
    # speed moves it.
    anchor: float = field(init=False, default_factory=trio.current_time)
    speed: float = field(init=False, default=1.0)
    client: MessageAssembler = field(init=False, default_factory=MessageAssembler)
    client_closed_first: bool = field(init=False, default=False)
    lockstep: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.speed = self.server.control.speed
        self.lockstep = self.server.lockstep

    async def play(self) -> None:
        with open_recording(self.server.recording) as reader:
            for record in reader:
                if isinstance(record, GapRecord):
                    self.report.notes.append(describe_gap(record))
                if not isinstance(record, FrameRecord) or record.kind is Kind.PONG:
                    continue  # pongs answered the recorded peer's pings; ours answer live ones
                if record.direction is Direction.UP:
                    go_on = await self._follow_client(record)
                else:
                    go_on = await self._send(record, reader.position)
                if not go_on:
                    return
            self.report.played_to_end = True
            if reader.status is not None and not reader.status.complete:
                self.report.note = f"the recording is {reader.status.describe()}"

    async def finish(self) -> None:
        """End the session the recording did not end: once the client has sent as many
        messages as the recorded one (its last replies), or after ``close_timeout``."""
        await self.sender.end_message()
        if self.report.played_to_end and not self.progress.closed.is_set():
            with trio.move_on_after(self.server.close_timeout):
                await self.progress.wait_for(self.client.count)
        await self.sender.ws.aclose(1000, "end of recording")

    async def _follow_client(self, record: FrameRecord) -> bool:
        """In lockstep, wait for the live client's message wherever the recorded client's
        ended; False if the live client closed instead."""
        self.client_closed_first |= record.kind is Kind.CLOSE
        message = self.client.feed(record.kind, record.fin, record.payload, record.time_us)
        if message is None or not self.lockstep:
            return True
        if not await self._wait_for_client(message):
            self.report.note = "the client closed the connection early"
            return False
        self.anchor = trio.current_time() - record.time_us / 1e6 / self.speed
        return True

    async def _wait_for_client(self, message: Message) -> bool:
        """Until the client has sent ``message``'s number of messages; says what it waits
        for after WAIT_NOTICE s, gives up lockstep after ``lockstep_timeout``."""
        server, progress = self.server, self.progress
        with trio.move_on_after(min(WAIT_NOTICE, server.lockstep_timeout)):
            return await progress.wait_for(message.index)
        waiting = (
            f"lockstep: waiting for client message #{message.index} (recorded at "
            f"{message.time_us / 1e6:.3f} s): "
            f"{describe_payload(message.payload, text=message.text)}"
        )
        if server.on_wait is not None:
            server.on_wait(self.report.client, waiting)
        with trio.move_on_after(max(server.lockstep_timeout - WAIT_NOTICE, 0)):
            return await progress.wait_for(message.index)
        self.lockstep = False
        self.report.notes.append(
            f"lockstep: client message #{message.index} (recorded at "
            f"{message.time_us / 1e6:.3f} s) did not come within {server.lockstep_timeout:g} s; "
            "the rest was played without waiting"
        )
        return True

    async def _until(self, seconds: float) -> None:
        """Until the recording's time ``seconds`` (scaled by the speed; not at all without
        delay), following pause, resume and speed changes as they come."""
        control = self.server.control
        while True:
            changed = control.changed
            now = trio.current_time()
            if control.paused:
                reached = (now - self.anchor) * self.speed
                await changed.wait()
                self.anchor = trio.current_time() - reached / self.speed
                continue
            if control.speed != self.speed:  # keep the position, change the pace
                reached = (now - self.anchor) * self.speed
                self.speed = control.speed
                self.anchor = now - reached / self.speed
            due = self.anchor + seconds / self.speed
            if not self.server.delay or now >= due:
                return
            with trio.move_on_at(due):
                await changed.wait()

    async def _send(self, record: FrameRecord, position: int) -> bool:
        """Send a recorded target frame at its time; False once the session is over."""
        server, report = self.server, self.report
        await self._until(record.time_us / 1e6)
        if record.kind is Kind.CLOSE and self.client_closed_first:
            # The recorded close was the echo of the client's: wait for this one's.
            with trio.move_on_after(server.close_timeout):
                await self.progress.closed.wait()
            report.played_to_end = True
            return False
        if self.progress.closed.is_set() or not await self.sender.send(
            record.kind, record.payload, record.fin
        ):
            report.note = "the client closed the connection before the recording ended"
            return False
        report.sent_frames += 1
        if server.on_progress is not None:
            server.on_progress(report.client, position, trio.current_time() - self.anchor)
        if record.kind is Kind.CLOSE:
            report.played_to_end = True
            return False
        return True
