"""The bounded hand-off between a live session and its recording's writer task.

The relay calls :meth:`EventBuffer.put` synchronously for every frame and must never
wait for the disk, so ``put`` either queues the record or, when the buffer is full,
drops it and counts it in a :class:`Loss`. The next record that fits is preceded by a
GAP record carrying those counts, so the file says exactly where events are missing
and how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .format import FLAG_DOWN, GapRecord, Kind

#: A queued record: (kind, flags, time_us, payload), ready to be encoded.
Entry = tuple[int, int, int, bytes]

#: What a queued entry costs in memory besides its payload (tuple, ints, bytes object).
ENTRY_OVERHEAD = 160

#: The writer lets up to this much queue up, for at most FLUSH_DELAY seconds, before it
#: takes a batch: one thread hand-off per batch rather than per frame keeps the relay's
#: share of the recording's cost small (the hand-off, not the frame, is what costs).
BATCH_BYTES = 256 << 10
FLUSH_DELAY = 0.005


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
        if gap.reason and gap.reason not in self.reason:
            self.reason = f"{self.reason}; {gap.reason}" if self.reason else gap.reason

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
        self.batch = min(BATCH_BYTES, limit // 4)
        self.dropped = Loss(0, 0, "")  # totals over the session, for the log
        self._entries: list[Entry] = []
        self._queued = 0
        self._in_flight = 0
        self._loss: Loss | None = None
        self._closed = False
        self._wakeup = trio.Event()

    def put(self, kind: int, flags: int, time_us: int, payload: bytes) -> bool:
        """Queue a record, or count it as lost when the buffer is full (returns False)."""
        if self._closed:
            return True
        cost = len(payload) + ENTRY_OVERHEAD
        if self._queued + self._in_flight + cost > self.limit:
            if self._loss is None:
                reason = "recording buffer full (the disk was slower than the session)"
                self._loss = Loss(time_us, time_us, reason)
                self.dropped.reason = reason
            self._loss.add(flags, time_us, len(payload))
            self.dropped.add(flags, time_us, len(payload))
            return False
        if self._loss is not None:
            self._close_gap()
        self._entries.append((kind, flags, time_us, payload))
        self._queued += cost
        if len(self._entries) == 1 or self._queued >= self.batch:
            self._wakeup.set()  # only the first entry and a full batch wake the writer
        return True

    def close(self, last: Entry) -> None:
        """Queue the final record (END); later puts are ignored."""
        if self._closed:
            return
        if self._loss is not None:
            self._close_gap()
        self._entries.append(last)
        self._closed = True
        self._wakeup.set()

    async def take(self) -> list[Entry]:
        """Everything queued, waiting for something; [] once closed and drained.

        Once something is queued, waits up to :data:`FLUSH_DELAY` for a full batch. The
        entries count against the limit until :meth:`written` is called.
        """
        while not self._entries:
            if self._closed:
                return []
            await self._wait()
        if not self._closed and self._queued < self.batch:
            with trio.move_on_after(FLUSH_DELAY):
                while not self._closed and self._queued < self.batch:
                    await self._wait()
        entries, self._entries = self._entries, []
        self._in_flight += self._queued
        self._queued = 0
        return entries

    async def _wait(self) -> None:
        await self._wakeup.wait()
        self._wakeup = trio.Event()

    def written(self) -> None:
        """The entries from the last :meth:`take` are out of memory's way."""
        self._in_flight = 0

    def _close_gap(self) -> None:
        assert self._loss is not None
        gap = self._loss.entry()
        self._entries.append(gap)
        self._queued += len(gap[3]) + ENTRY_OVERHEAD
        self._loss = None
