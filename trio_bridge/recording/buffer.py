"""The bounded hand-off between a live session and the thread that writes its recording.

The relay calls :meth:`EventBuffer.put` synchronously for every frame and must never
wait for the disk, so ``put`` either queues the record or, when the buffer is full,
drops it and counts it in a :class:`Loss`. The next record that fits is preceded by a
GAP record carrying those counts, so the file says exactly where events are missing
and how many.

The buffer is shared by two threads: the event loop puts, the recording thread takes.
A ``threading.Condition`` (the recording thread's, shared by all its buffers) guards
it; the relay holds it for a few attribute updates per frame and signals the thread
only when a buffer becomes non-empty or a batch is full, not for every frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .format import FLAG_DOWN, GapRecord, Kind
from .pipes import PipeChunk

#: What a record's payload can be: bytes, or target data held in a pipe (tee(2)).
Payload = bytes | PipeChunk

#: A queued record: (kind, flags, time_us, payload), ready to be encoded.
Entry = tuple[int, int, int, Payload]

#: What a queued entry costs in memory besides its payload (tuple, ints, bytes object).
ENTRY_OVERHEAD = 160

#: Pipes a session may hold queued for its recording (two descriptors each; see also
#: the process-wide :data:`~trio_bridge.recording.pipes.MAX_RECORDING_PIPES`). A pipe
#: chunk's bytes count against the buffer's limit like any payload.
MAX_PIPES = 16

#: The writer takes a batch when this much is queued, or :data:`FLUSH_DELAY` seconds
#: after the first frame of a batch: one wake-up of the recording thread per batch
#: rather than per frame keeps the relay's share of the recording's cost small.
BATCH_BYTES = 256 << 10
FLUSH_DELAY = 0.005


def release(entry: Entry) -> None:
    """Give up an entry that will not reach the file (frees a pipe chunk's pipe)."""
    payload = entry[3]
    if type(payload) is PipeChunk:
        payload.discard()


@dataclass
class Loss:
    """Events that happened but could not be recorded; becomes one GAP record."""

    first_us: int
    last_us: int
    reason: str
    frames_up: int = 0
    bytes_up: int = 0
    frames_down: int = 0
    bytes_down: int = 0

    def add(self, flags: int, time_us: int, size: int) -> None:
        if flags & FLAG_DOWN:
            self.frames_down += 1
            self.bytes_down += size
        else:
            self.frames_up += 1
            self.bytes_up += size
        self.first_us = min(self.first_us, time_us)
        self.last_us = max(self.last_us, time_us)

    def absorb(self, entry: Entry) -> None:
        """Count a queued entry that will not reach the file (a GAP entry adds its counts)."""
        kind, flags, time_us, payload = entry
        if kind == Kind.GAP:
            assert type(payload) is bytes
            self.merge(GapRecord.decode(time_us, payload, -1))
        elif kind not in (Kind.META, Kind.END):
            self.add(flags, time_us, len(payload))

    def merge(self, gap: GapRecord) -> None:
        self.frames_up += gap.frames_up
        self.bytes_up += gap.bytes_up
        self.frames_down += gap.frames_down
        self.bytes_down += gap.bytes_down
        self.first_us = min(self.first_us, gap.time_us)
        self.last_us = max(self.last_us, gap.until_us)
        self.add_reason(gap.reason)

    def add_reason(self, reason: str) -> None:
        if reason and reason not in self.reason:
            self.reason = f"{self.reason}; {reason}" if self.reason else reason

    @property
    def total_frames(self) -> int:
        return self.frames_up + self.frames_down

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def record(self) -> GapRecord:
        return GapRecord(
            time_us=self.first_us,
            until_us=self.last_us,
            frames_up=self.frames_up,
            bytes_up=self.bytes_up,
            frames_down=self.frames_down,
            bytes_down=self.bytes_down,
            reason=self.reason,
        )

    def entry(self) -> Entry:
        return (Kind.GAP, 0, self.first_us, self.record().encode())


class EventBuffer:
    """Records queued for the writer, bounded in bytes (queued plus being written).

    ``on_ready(urgent)`` is called, with the condition held, when the buffer has
    something for the writer: ``urgent`` once a batch is full or the session ended.
    """

    def __init__(
        self,
        limit: int,
        condition: threading.Condition | None = None,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.limit = limit
        self.batch = min(BATCH_BYTES, limit // 4)
        self.dropped = Loss(0, 0, "")  # totals over the session, for the log
        self._condition = condition or threading.Condition()
        self._on_ready = on_ready
        self._entries: list[Entry] = []
        self._queued = 0
        self._in_flight = 0
        self._pipes = 0  # pipe chunks queued or in flight
        self._pipes_in_flight = 0
        self._loss: Loss | None = None
        self._closed = False

    def put(self, kind: int, flags: int, time_us: int, payload: Payload) -> bool:
        """Queue a record, or count it as lost when the buffer is full (returns False).

        The buffer owns ``payload`` from here on: a pipe chunk it cannot keep is freed.
        """
        size = len(payload)
        cost = size + ENTRY_OVERHEAD
        is_pipe = type(payload) is PipeChunk
        with self._condition:
            if self._closed:
                release((kind, flags, time_us, payload))
                return True
            if not self._has_room(cost, is_pipe):
                self._lose(flags, time_us, size)
                release((kind, flags, time_us, payload))
                return False
            first = not self._entries
            before = self._queued
            if self._loss is not None:
                self._close_gap()
            self._entries.append((kind, flags, time_us, payload))
            self._queued += cost
            self._pipes += is_pipe
            full = self._queued >= self.batch
            if first or (full and before < self.batch):
                self._signal(urgent=full)
        return True

    def room_for_pipe(self, size: int) -> bool:
        """Whether a pipe chunk of ``size`` bytes would be queued now (checked before a
        tee(2), so that a full buffer costs no pipe; :meth:`put` decides for good)."""
        return self._has_room(size + ENTRY_OVERHEAD, is_pipe=True)

    def lose(self, flags: int, time_us: int, size: int, reason: str = "") -> None:
        """Count a frame the observer could not even queue (e.g. no pipe to tee into)."""
        with self._condition:
            if not self._closed:
                self._lose(flags, time_us, size, reason)

    def close(self, last: Entry) -> None:
        """Queue the final record (END); later puts are ignored."""
        with self._condition:
            if self._closed:
                return
            if self._loss is not None:
                self._close_gap()
            self._entries.append(last)
            self._closed = True
            self._signal(urgent=True)

    def stop_accepting(self) -> list[Entry]:
        """No file will be written: ignore later puts; the entries still queued."""
        with self._condition:
            self._closed = True
            entries, self._entries = self._entries, []
            self._queued = 0
            self._pipes = self._pipes_in_flight
            return entries

    def take(self) -> list[Entry]:
        """Everything queued (the writer's side). The entries count against the limit
        until :meth:`written` is called."""
        with self._condition:
            entries, self._entries = self._entries, []
            self._in_flight += self._queued
            self._queued = 0
            self._pipes_in_flight = self._pipes
            return entries

    def written(self) -> None:
        """The entries from the last :meth:`take` are out of memory's way."""
        with self._condition:
            self._in_flight = 0
            self._pipes -= self._pipes_in_flight
            self._pipes_in_flight = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _has_room(self, cost: int, is_pipe: bool) -> bool:
        if is_pipe and self._pipes >= MAX_PIPES:
            return False
        return self._queued + self._in_flight + cost <= self.limit

    def _signal(self, urgent: bool) -> None:
        if self._on_ready is not None:
            self._on_ready(urgent)

    def _lose(self, flags: int, time_us: int, size: int, reason: str = "") -> None:
        reason = reason or "recording buffer full (the disk was slower than the session)"
        if self._loss is None:
            self._loss = Loss(time_us, time_us, reason)
        for loss in (self._loss, self.dropped):
            loss.add(flags, time_us, size)
            loss.add_reason(reason)

    def _close_gap(self) -> None:
        assert self._loss is not None
        gap = self._loss.entry()
        self._entries.append(gap)
        self._queued += len(gap[3]) + ENTRY_OVERHEAD
        self._loss = None
