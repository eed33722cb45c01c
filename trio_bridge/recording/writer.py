"""Writing one recording: file output in a worker thread, fed from an :class:`EventBuffer`.

Why a thread: regular files have no non-blocking mode (``O_NONBLOCK`` is ignored and
epoll reports them always ready), so a slow or stalled disk would stall the whole
event loop, and every session with it, if the writes ran there. Each batch of queued
records (see :data:`~trio_bridge.recording.buffer.BATCH_BYTES`) is encoded (CRC-32 over
payloads releases the GIL) and written with one ``pwritev`` in ``trio.to_thread.run_sync``;
while it runs, the session keeps relaying and new records queue up for the next batch,
so batches grow when the disk is slow.

Failure policy: a write error (disk full, quota, I/O error) cuts the file back to the
end of its last complete record, so it stays readable, and what could not be written
is counted. The writer retries at most once per :data:`RETRY_INTERVAL`; the first
write that succeeds again starts with a GAP record holding the counts. The session is
never affected. ``fsync`` runs once, when the recording is complete: crash safety comes
from the format (a cut file reads to its last complete record), not from syncing
every write, which would cap throughput at the disk's flush rate.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import trio

from .buffer import Entry, EventBuffer, Loss
from .format import Kind, encode_header, encode_prelude

log = logging.getLogger("trio_bridge.recording")

RETRY_INTERVAL = 1.0
IOV_MAX = 1024


class RecordingFile:
    """An append-only recording on disk; every method blocks, so call them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self.size = 0  # bytes of complete records (and prelude) in the file

    def append(self, entries: Sequence[Entry]) -> tuple[int, OSError | None]:
        """Write ``entries`` after the last complete record.

        Returns how many were written completely and the error that stopped the rest,
        if any; after an error the file is cut back to its last complete record.
        """
        buffers: list[bytes] = [encode_prelude()] if self.size == 0 else []
        start = len(buffers[0]) if buffers else 0
        ends: list[int] = []  # where each record ends, relative to self.size
        position = start
        for kind, flags, time_us, payload in entries:
            header = encode_header(kind, flags, time_us, payload)
            buffers.append(header)
            buffers.append(payload)
            position += len(header) + len(payload)
            ends.append(position)
        written = 0
        pending = deque(memoryview(b) for b in buffers if b)
        try:
            while pending:
                n = os.pwritev(self._fd, list(islice(pending, IOV_MAX)), self.size + written)
                written += n
                _consume(pending, n)
        except OSError as exc:
            done = bisect.bisect_right(ends, written)
            keep = ends[done - 1] if done else 0
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size + keep)
            self.size += keep
            return done, exc
        self.size += position
        return len(entries), None

    def close(self, sync: bool) -> None:
        try:
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
        finally:
            os.close(self._fd)


def _consume(pending: deque[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from a queue of buffers (after a short write)."""
    while n:
        head = pending[0]
        if len(head) <= n:
            n -= len(head)
            pending.popleft()
        else:
            pending[0] = head[n:]
            n = 0


class SessionWriter:
    """The task that moves one session's records from its buffer to its file."""

    def __init__(
        self,
        session_id: str,
        path: Path,
        meta: Entry,
        buffer: EventBuffer,
        on_done: Callable[[SessionWriter], None],
    ) -> None:
        self.session_id = session_id
        self.path = path
        self.meta = meta  # written first, whenever the first write succeeds
        self.buffer = buffer
        self.on_done = on_done
        self.created = False  # the file exists
        self.complete = False  # the END record is in the file
        self.lost = Loss(0, 0, "")  # events lost to write errors, over the session
        self._pending_loss: Loss | None = None  # lost and not yet marked in the file
        self._retry_at = 0.0

    async def run(self) -> None:
        try:
            try:
                file = await trio.to_thread.run_sync(RecordingFile, self.path)
            except OSError as exc:
                log.error(
                    "session %s: cannot create recording %s: %s; this session is not recorded",
                    self.session_id,
                    self.path,
                    exc.strerror or exc,
                )
                await self._discard()
                return
            self.created = True
            try:
                await self._write(file, [])  # META now: readers can follow from the start
                await self._write_loop(file)
            finally:
                if self.complete:
                    await trio.to_thread.run_sync(file.close, True)
                else:
                    file.close(sync=False)  # may be cancelled here: no await, no fsync
            self._report()
        finally:
            self.on_done(self)

    async def _write_loop(self, file: RecordingFile) -> None:
        while entries := await self.buffer.take():
            ended = entries[-1][0] == Kind.END
            retry_later = trio.current_time() < self._retry_at
            if not ended and self._pending_loss is not None and retry_later:
                for entry in entries:
                    self._lose(entry)
                self.buffer.written()
                continue
            await self._write(file, entries)
            self.buffer.written()
            if ended and not self.complete and self._pending_loss is not None:
                # The session is over: one last try to mark the gap and the end,
                # which are small and may fit where the failed batch was cut away.
                await self._write(file, [entries[-1]])

    async def _write(self, file: RecordingFile, entries: list[Entry]) -> None:
        """Write a batch, preceded by the META record while the file is still empty and
        by the GAP record of earlier losses if there are any."""
        loss = self._pending_loss
        gap = loss.entry() if loss is not None else None
        head = [self.meta] if file.size == 0 else []
        batch = [*head, *([gap] if gap is not None else []), *entries]
        done, error = await trio.to_thread.run_sync(file.append, batch)
        done_after_head = done - len(head)
        if loss is not None and done_after_head > 0:
            log.warning(
                "session %s: recording resumed; gap of %d frames (%d bytes) marked in %s",
                self.session_id,
                loss.total_frames,
                loss.total_bytes,
                self.path,
            )
            self._pending_loss = None
        if done == len(batch):
            self.complete = batch[-1][0] == Kind.END
            return
        assert error is not None
        if self._pending_loss is None:
            first_us = batch[done][2]
            reason = f"write failed: {error.strerror or error}"
            self._pending_loss = Loss(first_us, first_us, reason)
            log.error(
                "session %s: cannot write recording %s: %s; the session goes on, "
                "unrecorded events are counted and the gap will be marked if the disk allows",
                self.session_id,
                self.path,
                error.strerror or error,
            )
        for entry in batch[done:]:
            if entry is not gap and entry is not self.meta:
                self._lose(entry)
        self._retry_at = trio.current_time() + RETRY_INTERVAL

    def _lose(self, entry: Entry) -> None:
        """Count an entry that will not reach the file."""
        assert self._pending_loss is not None
        self._pending_loss.absorb(entry)
        kind, flags, time_us, payload = entry
        if kind not in (Kind.GAP, Kind.META, Kind.END):  # GAPs were counted when dropped
            self.lost.add(flags, time_us, len(payload))
            self.lost.reason = self.lost.reason or self._pending_loss.reason

    async def _discard(self) -> None:
        """Drain the buffer without a file, so the session's memory stays bounded."""
        while await self.buffer.take():
            self.buffer.written()

    def _report(self) -> None:
        dropped, failed = self.buffer.dropped, self.lost
        if dropped.total_frames or failed.total_frames:
            log.warning(
                "session %s: recording %s is missing %d frames (%d bytes): %s",
                self.session_id,
                self.path,
                dropped.total_frames + failed.total_frames,
                dropped.total_bytes + failed.total_bytes,
                "; ".join(r for r in (dropped.reason, failed.reason) if r),
            )
        if not self.complete:
            log.warning(
                "session %s: recording %s has no END record (see the errors above)",
                self.session_id,
                self.path,
            )
