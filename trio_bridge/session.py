"""One relayed connection: a nursery with one task per direction and explicit close rules.

Close semantics (each ends with one log line, see :meth:`Session.summary`):

- the target sends EOF -> close 1000 "target closed the connection";
- the target resets or fails -> close 1011 with the cause;
- the client sends a close frame -> it is echoed, the target socket is closed at once;
- the client vanishes (EOF or reset without a close frame) -> the target is closed at once;
- a protocol error by the client -> websockets' close code (1002, 1007, 1009);
- idle / session time limits and server shutdown -> close 1001 with the reason.

After the bridge sends a close frame it waits at most ``close_timeout`` for the client's
answer, then closes the TCP connection anyway.

Memory per session is bounded: each direction holds at most one chunk read from one
side (``RECV_SIZE``, or one message of ``max_message_size`` inside websockets' parser)
and reads again only after it has been written to the other side, so a slow reader
slows down the writer (backpressure both ways). An idle session holds no buffer.
With permessage-deflate a chunk read from the client can inflate ~1000-fold, so it is
parsed ``INFLATE_SLICE`` bytes at a time, each slice's messages written to the target
before the next is parsed (see :meth:`Session._client_to_target`).

A failure stays in its session: an observer that raises is detached (the relay goes
on), and any other exception in a relay task ends that session only, with 1011.
"""

from __future__ import annotations

import codecs
import logging
import random
import secrets
import socket
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Literal, cast

import trio
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN

from .channel import ClientChannel, ClientGone
from .config import Config, Limits
from .heartbeat import Heartbeats
from .netio import PEER_GONE, Bytes, Fairness
from .observe import Direction, ObservedFrame, SessionObserver
from .observe import Opcode as ObservedOpcode
from .transport import Transport
from .zerocopy import SPLICE_AFTER, SPLICE_AVAILABLE, BurstEnd, binary_frame_header, splice_burst

log = logging.getLogger("trio_bridge.session")

RECV_SIZE = 256 * 1024
TRAFFIC_INTERVAL = 10.0
SMALL_FRAME = 16 * 1024  # up to this payload size, header and payload go out as one write
# With compression, client data is parsed this many bytes at a time. Deflate expands at
# most 1032:1, so the messages one slice completes hold at most ~4 MiB, plus the one
# message (<= max_message_size) that began in an earlier slice: the per-session budget
# of inflated bytes. The next slice is parsed, and the client read again, only once
# they are written to the target. A RECV_SIZE read could hold ~260 MiB.
INFLATE_SLICE = 4 * 1024
MAX_CLOSE_REASON = 123  # bytes of UTF-8 in a close frame (RFC 6455 5.5: 125 - the code)

NORMAL, GOING_AWAY, ABNORMAL = (
    CloseCode.NORMAL_CLOSURE,
    CloseCode.GOING_AWAY,
    CloseCode.ABNORMAL_CLOSURE,
)
INTERNAL_ERROR, INVALID_DATA = CloseCode.INTERNAL_ERROR, CloseCode.INVALID_DATA
DATA_OPCODES = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)
# websockets' opcodes as observers see them: the observer API has no websockets type.
OBSERVED_OPCODES = {opcode: ObservedOpcode(opcode.value) for opcode in Opcode}


@dataclass
class SessionStats:
    """What the end-of-session log line reports."""

    session_id: str
    client: str
    target: str
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str = ""

    def journal_fields(self) -> dict[str, object]:
        """Structured fields for the session's end line (journald stores them as-is)."""
        return {
            "SESSION_ID": self.session_id,
            "CLIENT": self.client,
            "TARGET": self.target,
            "BYTES_UP": self.bytes_up,
            "BYTES_DOWN": self.bytes_down,
            "DURATION": round(time.monotonic() - self.started, 6),
            "CLOSE_CODE": self.close_code,
            "CLOSE_REASON": self.close_reason,
        }

    def summary(self) -> str:
        duration = time.monotonic() - self.started
        return (
            f"session {self.session_id} ended: client={self.client} target={self.target} "
            f"up={self.bytes_up}B down={self.bytes_down}B duration={duration:.3f}s "
            f"close={self.close_code} by {self.closed_by} ({self.close_reason or 'no reason'})"
        )


def new_session_id() -> str:
    return secrets.token_hex(4)


class Session:
    """Relays between an open WebSocket (``channel``) and a connected ``target``."""

    def __init__(
        self,
        channel: ClientChannel,
        target: Transport,
        config: Config,
        stats: SessionStats,
        observer: SessionObserver | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        """``heartbeats``: the bridge's ping timer; without it no pings are sent."""
        self.channel = channel
        self.protocol = channel.protocol
        self.target = target
        self.config = config
        self.stats = stats
        # Shown every frame; None once it has failed (see _observer_failed).
        self.observer = observer
        # Told of the end even after a failure, so it can finish and release its recording.
        self._end_observer = observer
        self._heartbeats = heartbeats if config.limits.heartbeat is not None else None
        # The closing handshake and each ping run as tasks started when needed: an idle
        # session costs its two relay tasks only (a task is ~4.5 KiB).
        self._close_request: tuple[int, str] | None = None
        self._pong = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._target_failed = False
        self._close_observed = False
        self._text_decoder: codecs.IncrementalDecoder | None = None  # inside a text message

    # -- public -------------------------------------------------------------------

    async def run(self) -> None:
        limits = self.config.limits
        try:
            await self._relay(limits)
        except Exception:
            # A bug must cost this session only, never the bridge and its other sessions.
            log.exception("session %s: internal error; ending this session", self.stats.session_id)
            self._record_end(INTERNAL_ERROR, "internal error in the bridge", "bridge")
            await self._close_after_error(INTERNAL_ERROR, "internal error in the bridge")
        finally:
            await self.target.aclose()
            await self.channel.transport.aclose()
            if self.stats.close_code is None:
                self._record_end(ABNORMAL, "session cancelled", "bridge")
            self._observe_end()

    async def _relay(self, limits: Limits) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._scope = nursery, nursery.cancel_scope
                nursery.start_soon(self._client_to_target)
                nursery.start_soon(self._target_to_client)
                if self._close_request is not None:  # asked for before the relay began
                    nursery.start_soon(self._closer)
                self._schedule_ping(first=True)
                if limits.idle_timeout is not None:
                    nursery.start_soon(self._idle_watch, limits.idle_timeout)
                if limits.session_timeout is not None:
                    nursery.start_soon(self._session_limit, limits.session_timeout)
                if self.config.traffic:
                    nursery.start_soon(self._traffic_report)
        finally:
            self._nursery = None  # closed to new tasks: a late close request or ping is moot

    def request_close(self, code: int, reason: str) -> None:
        """Start a server-side closing handshake; the first request wins."""
        if self._close_request is None:
            self._close_request = (code, reason)
            if self._nursery is not None:
                self._nursery.start_soon(self._closer)

    # -- client -> target ------------------------------------------------------------

    async def _client_to_target(self) -> None:
        """Read the client, parse its frames, forward their data; the only reader of the
        client socket. It reads again only once the last read's messages are written
        (backpressure), and with compression parses ``INFLATE_SLICE`` bytes at a time."""
        protocol = self.protocol
        client = self.channel.transport
        fairness = Fairness()  # per frame: one read may hold thousands
        try:
            while True:
                try:
                    data = await client.recv(RECV_SIZE)
                except PEER_GONE:
                    data = b""
                if not data:
                    protocol.receive_eof()
                    self._record_end(ABNORMAL, "client vanished without a close frame", "client")
                    self._abort()
                    return
                if protocol.extensions and len(data) > INFLATE_SLICE:
                    pieces: tuple[bytes, ...] | list[bytes] = [
                        data[i : i + INFLATE_SLICE] for i in range(0, len(data), INFLATE_SLICE)
                    ]
                else:
                    pieces = (data,)
                for piece in pieces:
                    protocol.receive_data(piece)
                    if await self._relay_client_frames(fairness):
                        return
        except ClientGone as exc:
            self._record_end(ABNORMAL, f"client connection failed: {exc}", "client")
            self._abort()

    async def _relay_client_frames(self, fairness: Fairness) -> bool:
        """Act on the frames websockets parsed, then send what it queued (pongs, a close
        echo, a failure's close frame); True when that ends the session."""
        protocol = self.protocol
        stats = self.stats
        valid = True
        # After the handshake, websockets only emits frames.
        for frame in cast(list[Frame], protocol.events_received()):
            await fairness.tick()
            opcode = frame.opcode
            if self.observer is not None:
                self._observe(Direction.UP, opcode, frame.data, frame.fin)
            if opcode not in DATA_OPCODES:
                self._control_frame(frame)
                continue
            text = opcode is Opcode.TEXT or self._text_decoder is not None
            if text and not self._valid_text(frame):
                valid = False
                break
            payload = frame.data
            if payload:
                await self._send_to_target(payload)
                stats.bytes_up += len(payload)
        await self.channel.flush()
        self._observe_close_sent()
        if protocol.parser_exc is not None or not valid:
            await self._end_after_client_error()
            return True
        if protocol.close_rcvd is not None:  # closing handshake complete, either way
            self._abort()
            return True
        return False

    def _valid_text(self, frame: Frame) -> bool:
        """Whether a text message is valid UTF-8 so far (websockets leaves checking it
        to the I/O layer); if not, fail the connection with 1007."""
        if frame.opcode is Opcode.TEXT:
            self._text_decoder = codecs.getincrementaldecoder("utf-8")()
        assert self._text_decoder is not None
        try:
            self._text_decoder.decode(frame.data, final=frame.fin)
        except UnicodeDecodeError as exc:
            reason = f"invalid UTF-8 in text message: {exc.reason}"
            self.protocol.fail(INVALID_DATA, fit_reason(reason))
            return False
        if frame.fin:
            self._text_decoder = None
        return True

    def _control_frame(self, frame: Frame) -> None:
        """websockets answers pings and close frames itself; the session hears pongs for
        its keepalive, shows the observer the pong queued, and notes a client's close."""
        opcode = frame.opcode
        if opcode is Opcode.PONG:
            self._pong.set()
        elif opcode is Opcode.PING:
            self._observe(Direction.DOWN, Opcode.PONG, frame.data)
        elif opcode is Opcode.CLOSE and (rcvd := self.protocol.close_rcvd) is not None:
            self._record_end(rcvd.code, rcvd.reason, "client")

    async def _end_after_client_error(self) -> None:
        """websockets sent the close frame (1002, 1007, 1009) and EOF: end without waiting
        for an answer, but let the client read ours (closing with unread input sends RST,
        which can destroy it). Only the client's one reader, this task, may drain it."""
        protocol = self.protocol
        sent = protocol.close_sent
        code, reason = (sent.code, sent.reason) if sent else (ABNORMAL, "")
        self._record_end(code, reason or str(protocol.parser_exc), "bridge")
        await self.channel.linger_and_close(self.config.limits.close_timeout)
        self._abort()

    async def _send_to_target(self, data: Bytes) -> None:
        """Forward client data; once the target has failed, data is dropped while the
        closing handshake with the client completes."""
        if self._target_failed:
            return
        try:
            await self.target.send_all(data)
        except PEER_GONE:
            self._target_failed = True
            self._target_reset()

    # -- target -> client ------------------------------------------------------------

    async def _target_to_client(self) -> None:
        try:
            source = self._splice_source()
            if source is not None:
                await self._target_to_client_spliced(source)
            else:
                while await self._relay_framed_chunk():
                    pass
        except ClientGone as exc:
            self._record_end(ABNORMAL, f"client connection failed: {exc}", "client")
            self._abort()

    def _splice_source(self) -> socket.socket | None:
        """The target's socket if its data may be spliced to the client: zero copy is on,
        nothing transforms the payload (deflate, TLS on either side), and nothing
        observes it (an observer, such as the recorder, must see every byte)."""
        if (
            self.config.zero_copy
            and SPLICE_AVAILABLE
            and self.observer is None
            and not self.protocol.extensions
            and self.channel.transport.raw is not None
        ):
            return self.target.raw
        return None

    async def _target_to_client_spliced(self, source: socket.socket) -> None:
        """Frame what trickles, splice what streams (:mod:`trio_bridge.zerocopy`).

        After a wait the first chunk goes framed: interactive traffic (keystrokes, small
        screen updates) costs fewer system calls without a pipe, and an idle session
        holds none (two descriptors each). Only a full read, the sign of a bulk stream,
        switches to splicing until the target has nothing more to give.
        """
        fairness = Fairness()
        while n := await self._relay_framed_chunk():
            if n < SPLICE_AFTER:
                continue
            end = await splice_burst(source, self.channel, fairness, self._count_down)
            if end is BurstEnd.EOF:
                self._target_closed()
            elif end is BurstEnd.RESET:
                self._target_reset()
            if end is not BurstEnd.IDLE:
                return

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n

    async def _relay_framed_chunk(self) -> int:
        """Relay one chunk from the target as one binary message; its size, 0 when done."""
        data = await self._read_target()
        protocol = self.protocol
        if not data or protocol.state is not OPEN:
            return 0
        if self.observer is not None:
            self._observe(Direction.DOWN, Opcode.BINARY, data)
        if protocol.extensions:
            protocol.send_binary(data)  # the extension (deflate) transforms the payload
            await self.channel.flush()
            # Deflating a chunk takes milliseconds: one Fairness tick per chunk would let
            # the session hold the event loop for 16 of them.
            await trio.lowlevel.checkpoint()
        elif not await self._send_binary_frame(data):
            return 0
        self.stats.bytes_down += len(data)
        return len(data)

    async def _send_binary_frame(self, data: bytes) -> bool:
        """A binary frame written without websockets' copy of the whole frame.

        False, sending nothing, once a close frame has gone out (RFC 6455 5.5.1).
        """
        channel = self.channel
        async with channel.write_turn:
            if self.protocol.state is not OPEN:
                return False
            header = binary_frame_header(len(data))
            if len(data) <= SMALL_FRAME:
                await channel.send_raw(header + data)  # one system call beats saving a copy
            else:
                await channel.send_raw(header, more=True)
                await channel.send_raw(data)
        return True

    async def _read_target(self) -> bytes:
        """Read from the target; on EOF or failure, ask for the matching close and return b""."""
        try:
            data = await self.target.recv(RECV_SIZE)
        except PEER_GONE:
            self._target_reset()
            return b""
        if not data:
            self._target_closed()
        return data

    def _target_closed(self) -> None:
        self.request_close(NORMAL, "target closed the connection")

    def _target_reset(self) -> None:
        self.request_close(INTERNAL_ERROR, f"target {self.stats.target} reset the connection")

    # -- closing ---------------------------------------------------------------------

    async def _closer(self) -> None:
        assert self._close_request is not None
        code, reason = self._close_request
        protocol = self.protocol
        if protocol.state is OPEN:
            protocol.send_close(code, fit_reason(reason))
            self._record_end(code, reason, "bridge")
            self._observe_close_sent()
            try:
                with trio.move_on_after(self.config.limits.close_timeout):
                    await self.channel.flush()
            except ClientGone:
                self._abort()
                return
        # The client's answer ends the session via _client_to_target; don't wait forever.
        self._end_within_close_timeout()

    def _observe_close_sent(self) -> None:
        """Report the close frame the protocol sent (ours, an echo, or a failure), once."""
        sent = self.protocol.close_sent
        if self.observer is not None and sent is not None and not self._close_observed:
            self._close_observed = True
            # An empty close frame (no code: 1005) must stay empty; serialize() refuses 1005.
            payload = b"" if sent.code == CloseCode.NO_STATUS_RCVD else sent.serialize()
            self._observe(Direction.DOWN, Opcode.CLOSE, payload)

    async def _close_after_error(self, code: int, reason: str) -> None:
        """After the relay tasks stopped on an error: send a close frame if one can still
        be framed, give the client ``close_timeout`` to read it, and close.

        Not when a write to the client was cut short: the close frame would be read as
        the rest of that frame's payload.
        """
        protocol = self.protocol
        if protocol.state is not OPEN or self.channel.write_turn.torn:
            return
        protocol.send_close(code, fit_reason(reason))
        self._observe_close_sent()
        timeout = self.config.limits.close_timeout
        try:
            with trio.move_on_after(timeout):
                await self.channel.flush()
            await self.channel.linger_and_close(timeout)
        except (ClientGone, *PEER_GONE):
            pass

    def _end_within_close_timeout(self) -> None:
        assert self._scope is not None
        self._scope.deadline = min(
            self._scope.deadline, trio.current_time() + self.config.limits.close_timeout
        )

    def _abort(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _record_end(self, code: int, reason: str, by: str) -> None:
        if self.stats.close_code is None:
            self.stats.close_code = code
            self.stats.close_reason = reason
            self.stats.closed_by = by

    # -- the observer ----------------------------------------------------------------------

    def _observe(self, direction: Direction, opcode: Opcode, data: Bytes, fin: bool = True) -> None:
        """Show the observer a frame, as the project's :class:`ObservedFrame`. Callers on
        the relay's path check ``self.observer`` first, so that an unobserved session
        pays no call per frame."""
        observer = self.observer
        if observer is None:
            return
        payload = data if type(data) is bytes else bytes(data)  # the observer may keep it
        frame = ObservedFrame(OBSERVED_OPCODES[opcode], payload, fin)
        try:
            observer.on_frame(direction, frame)
        except Exception:
            self._observer_failed("on_frame")

    def _observer_failed(self, hook: str) -> None:
        """Detach the observer after its first exception, from inside ``except``.

        An observer (the recorder, an operator's plugin) is a side tap: its bug ends its
        own recording, logged once with the traceback, and the relay goes on.
        """
        self.observer = None
        log.exception(
            "session %s: the session observer failed in %s; it sees nothing more of this "
            "session, the relay goes on",
            self.stats.session_id,
            hook,
        )

    def _observe_end(self) -> None:
        """Tell the observer the session ended, even one detached after a failure: that
        is when it finishes its recording and releases what it holds."""
        observer = self._end_observer
        if observer is None:
            return
        stats = self.stats
        try:
            observer.on_end(stats.close_code, stats.close_reason, stats.closed_by)
        except Exception:
            if self.observer is not None:
                self._observer_failed("on_end")
            else:  # its first failure was logged with a traceback already
                log.warning(
                    "session %s: the failed session observer also failed in on_end",
                    stats.session_id,
                )

    # -- timers ------------------------------------------------------------------------

    def _schedule_ping(self, *, first: bool) -> None:
        """Ask the bridge's timer for this session's next ping.

        Jittered (90-100% of ``--heartbeat``, 50-100% before the first ping): sessions
        opened together (a reconnect storm after a restart, a load test) would
        otherwise ping together forever, thousands of pings and pongs in one burst that
        delays every session's data (p99 685 ms in a 3,000-session soak).
        """
        interval = self.config.limits.heartbeat
        if self._heartbeats is None or interval is None:
            return
        delay = interval * random.uniform(0.5 if first else 0.9, 1.0)
        self._heartbeats.schedule(self, trio.current_time() + delay)

    def ping_due(self) -> None:
        """Called by the bridge's timer (:class:`~trio_bridge.heartbeat.Heartbeats`)."""
        if self._nursery is not None and self.protocol.state is OPEN:
            self._nursery.start_soon(self._keepalive)

    async def _keepalive(self) -> None:
        """Ping; no pong within ``--heartbeat`` of queueing the ping ends the session.

        The deadline covers writing the ping too: a client that stopped reading leaves
        the downstream relay blocked in a write, holding the write lock, so the ping
        would wait forever and the session with it. Such a peer is as dead as a silent one.
        """
        interval = self.config.limits.heartbeat
        assert interval is not None
        reason = f"keepalive: no pong within {interval:g} s"
        try:
            outcome = await self._ping(interval)
        except ClientGone as exc:
            self._record_end(ABNORMAL, f"client connection failed: {exc}", "client")
            self._abort()
            return
        if outcome == "pong":
            self._schedule_ping(first=False)
            return
        if outcome == "closing":
            return
        if outcome == "unwritten":
            # A close frame would queue behind the same unread data: close the TCP
            # connection without one.
            why = f"{reason} (the client stopped reading; closed without a close frame)"
            self._record_end(ABNORMAL, why, "bridge")
            self._abort()
            return
        self.protocol.fail(INTERNAL_ERROR, fit_reason(reason))
        self._record_end(INTERNAL_ERROR, reason, "bridge")
        self._observe_close_sent()
        with trio.move_on_after(self.config.limits.close_timeout), suppress(ClientGone):
            await self.channel.flush()
        # _client_to_target, the only reader, drains until the client's EOF.
        self._end_within_close_timeout()

    async def _ping(self, interval: float) -> Literal["pong", "silent", "unwritten", "closing"]:
        """Ping: did the pong come within ``interval``, or was the ping not even written
        by then?"""
        protocol = self.protocol
        if protocol.state is not OPEN:
            return "closing"
        self._pong = pong = trio.Event()
        payload = secrets.token_bytes(4)
        protocol.send_ping(payload)
        if self.observer is not None:
            self._observe(Direction.DOWN, Opcode.PING, payload)
        written = False
        with trio.move_on_after(interval):
            await self.channel.flush()
            written = True
            await pong.wait()
        if pong.is_set():
            return "pong"
        return "silent" if written else "unwritten"

    async def _idle_watch(self, idle_timeout: float) -> None:
        stats = self.stats
        step = idle_timeout / 4
        last_seen = (stats.bytes_up, stats.bytes_down)
        last_change = trio.current_time()
        while True:
            await trio.sleep(step)
            now_seen = (stats.bytes_up, stats.bytes_down)
            if now_seen != last_seen:
                last_seen, last_change = now_seen, trio.current_time()
            elif trio.current_time() - last_change >= idle_timeout:
                self.request_close(GOING_AWAY, f"idle for {idle_timeout:g} s")
                return

    async def _traffic_report(self) -> None:
        stats = self.stats
        while True:
            await trio.sleep(TRAFFIC_INTERVAL)
            log.info(
                "session %s traffic: up=%dB down=%dB",
                stats.session_id,
                stats.bytes_up,
                stats.bytes_down,
            )

    async def _session_limit(self, limit: float) -> None:
        await trio.sleep(limit)
        self.request_close(GOING_AWAY, f"session time limit of {limit:g} s reached")


def fit_reason(reason: str) -> str:
    """``reason`` clipped to fit a close frame: 123 bytes of UTF-8 (RFC 6455 5.5).

    websockets' ``send_close`` and ``fail`` raise ``ProtocolError`` on a longer reason,
    and reasons often quote things of any length (target names, paths, errors), so
    every close frame the bridge sends passes its reason through here. A clipped reason
    ends with "..." and never splits a character.
    """
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON:
        return reason
    # Cutting inside a multi-byte character leaves a partial sequence at the end only.
    return encoded[: MAX_CLOSE_REASON - 3].decode("utf-8", "ignore") + "..."
