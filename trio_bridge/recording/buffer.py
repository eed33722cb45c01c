"""The bounded hand-off between a live session and the writing of its recording.

The relay calls :meth:`EventBuffer.put` synchronously for every frame and must never
wait for the disk, so ``put`` queues the record or, when the session's buffer is full
(the disk is slower than the session), drops it and counts it in a :class:`Loss`. The
next record that fits is preceded by a GAP record carrying those counts, so the file
says exactly where events are missing and how many. A full buffer is the only reason
the recorder drops a frame while the disk takes writes.

Everything here runs on the Trio thread: the relay puts, the session's writing task
takes batches and queues them for the recorder's writing thread; a batch counts against
the limit until it is written, so a session's recording never holds more than ``limit``
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .format import FLAG_DOWN, GapRecord, Kind

#: A queued record: (kind, flags, time_us, payload), ready to be encoded.
Entry = tuple[int, int, int, bytes]

#: What a queued entry costs in memory besides its payload (tuple, ints, bytes object).
ENTRY_OVERHEAD = 160


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

    def absorb(self, kind: int, flags: int, time_us: int, payload: bytes) -> None:
        """Count a record that will not be in the file (a GAP record adds its counts)."""
        if kind == Kind.GAP:
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
    """Records queued for the writer, bounded in bytes (queued plus being written)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = Loss(0, 0, "")  # totals over the session, for the log
        self.closed = False  # the END record is queued: later puts are ignored
        self.queued = 0
        self._entries: list[Entry] = []
        self._in_flight = 0
        self._loss: Loss | None = None
        self._ready = trio.Event()

    def put(self, kind: int, flags: int, time_us: int, payload: bytes) -> bool:
        """Queue a record, or count it as lost when the buffer is full (returns False)."""
        if self.closed:
            return True
        cost = len(payload) + ENTRY_OVERHEAD
        if self.queued + self._in_flight + cost > self.limit:
            reason = "recording buffer full (the disk was slower than the session)"
            if self._loss is None:
                self._loss = Loss(time_us, time_us, reason)
            for loss in (self._loss, self.dropped):
                loss.add(flags, time_us, len(payload))
                loss.add_reason(reason)
            return False
        self._append((kind, flags, time_us, payload))
        return True

    def close(self, last: Entry) -> None:
        """Queue the final record (END); later puts are ignored."""
        if not self.closed:
            self._append(last)
            self.closed = True

    async def wait(self) -> None:
        """Until there is something to take (at once if there is)."""
        if not self._entries:
            self._ready = trio.Event()
            await self._ready.wait()

    def take(self, most: int) -> tuple[list[Entry], int]:
        """The oldest entries, ``most`` bytes of them or one, and what they cost; they
        count against the limit until :meth:`written` is told that cost.

        Taking less than everything keeps room in the buffer while a batch is written:
        with the whole buffer in flight, every frame until the write returns is lost.
        """
        size = count = 0
        for count, entry in enumerate(self._entries, 1):  # noqa: B007 (count is kept)
            size += len(entry[3]) + ENTRY_OVERHEAD
            if size >= most:
                break
        entries, self._entries = self._entries[:count], self._entries[count:]
        self._in_flight += size
        self.queued -= size
        return entries, size

    def written(self, size: int) -> None:
        """Entries that cost ``size`` (see :meth:`take`) are out of memory's way."""
        self._in_flight -= size

    def _append(self, entry: Entry) -> None:
        if self._loss is not None:
            gap, self._loss = self._loss.entry(), None
            self._entries.append(gap)
            self.queued += len(gap[3]) + ENTRY_OVERHEAD
        self._entries.append(entry)
        self.queued += len(entry[3]) + ENTRY_OVERHEAD
        self._ready.set()
