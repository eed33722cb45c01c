"""Writing recordings: one thread for all of a recorder's files, fed by the sessions' buffers.

Why a thread: regular files have no non-blocking mode (``O_NONBLOCK`` is ignored and
epoll reports them always ready), so a slow or stalled disk would stall the whole
event loop, and every session with it, if the writes ran there.

Why one long-lived thread rather than ``trio.to_thread`` per batch: a hand-off through
the event loop costs a few scheduling rounds of a busy loop (measured: ~10 ms per
batch while a session relays 1 GiB/s), which capped the recorder at about a third
of a bulk session's rate. The thread instead waits on a condition that the buffers
signal directly, takes every ready session's records and writes each session's batch
with one ``pwritev`` (target data held in pipes is spliced into the file).

Failure policy: a write error (disk full, quota, I/O error) cuts the file back to the
end of its last complete record, so it stays readable, and what could not be written
is counted. The writer retries at most once per :data:`RETRY_INTERVAL`; the first
write that succeeds again starts with a GAP record holding the counts. The session is
never affected. ``fsync`` runs once, when the recording is complete, in the event
loop's worker threads rather than here, so a slow flush of one file does not hold up
the others: crash safety comes from the format (a cut file reads to its last complete
record), not from syncing every write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

from .buffer import FLUSH_DELAY, Entry, EventBuffer, Loss, release
from .format import Kind, encode_header, encode_prelude
from .pipes import PipeChunk

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
        if any; after an error the file is cut back to its last complete record. Pipe
        chunks are consumed either way: emptied into the file, or discarded.
        """
        batch = _Batch(self.size)
        try:
            if self.size == 0:
                batch.add(encode_prelude(), None)
            for index, (kind, flags, time_us, payload) in enumerate(entries):
                header = encode_header(kind, flags, time_us, len(payload))
                if isinstance(payload, PipeChunk):
                    batch.add(header, None)
                    batch.write(self._fd)
                    self._splice(payload, batch)
                    batch.completed(index)
                else:
                    batch.add(header, None)
                    batch.add(payload, index)
                    if len(batch.buffers) >= IOV_MAX:
                        batch.write(self._fd)
            batch.write(self._fd)
        except OSError as exc:
            done = batch.done
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, batch.committed)
            self.size = batch.committed
            for entry in entries[done:]:
                release(entry)
            return done, exc
        self.size = batch.committed
        return len(entries), None

    def close(self, sync: bool) -> None:
        try:
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def _splice(self, chunk: PipeChunk, batch: _Batch) -> None:
        """Move a pipe chunk's bytes into the file (copied once, by the kernel)."""
        left = chunk.length
        try:
            while left:
                moved = os.splice(chunk.pipe[0], self._fd, left, offset_dst=batch.position)
                if moved == 0:
                    raise OSError(0, "the recording pipe ran dry")
                batch.position += moved
                left -= moved
        except BaseException:
            chunk.discard()
            raise
        chunk.emptied()


class _Batch:
    """Buffers on their way into a file, and which records they complete."""

    def __init__(self, position: int) -> None:
        self.position = position  # where the next byte goes
        self.committed = position  # the end of the last complete record
        self.done = 0  # entries complete
        self.buffers: deque[memoryview] = deque()
        self._ends: deque[tuple[int, int]] = deque()  # (entry index, end offset) queued
        self._queued_to = position

    def add(self, data: bytes, completes: int | None) -> None:
        """Queue ``data``; with ``completes``, it is the last part of that entry."""
        if data:
            self.buffers.append(memoryview(data))
            self._queued_to += len(data)
        if completes is not None:
            self._ends.append((completes, self._queued_to))

    def write(self, fd: int) -> None:
        while self.buffers:
            n = os.pwritev(fd, list(islice(self.buffers, IOV_MAX)), self.position)
            self.position += n
            _consume(self.buffers, n)
            while self._ends and self._ends[0][1] <= self.position:
                index, end = self._ends.popleft()
                self.done, self.committed = index + 1, end
        self._queued_to = self.position

    def completed(self, index: int) -> None:
        """An entry written outside :meth:`write` (a spliced payload) is complete."""
        self.done, self.committed = index + 1, self.position
        self._queued_to = self.position


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
    """One session's recording, as the recording thread sees it: its buffer and file.

    Every method but the constructor runs in the recording thread.
    """

    def __init__(self, session_id: str, path: Path, meta: Entry, buffer: EventBuffer) -> None:
        self.session_id = session_id
        self.path = path
        self.meta = meta  # written first, whenever the first write succeeds
        self.buffer = buffer
        self.file: RecordingFile | None = None
        self.finished = False  # nothing more will be written
        self.complete = False  # the END record is in the file
        self.lost = Loss(0, 0, "")  # events lost to write errors, over the session
        self._pending_loss: Loss | None = None  # lost and not yet marked in the file
        self._retry_at = 0.0

    def write_pending(self) -> None:
        """Write what the session queued; sets :attr:`finished` after its END record."""
        if self.finished:
            return
        if self.file is None and not self._create():
            return
        entries = self.buffer.take()
        try:
            ended = bool(entries) and entries[-1][0] == Kind.END
            retry_later = time.monotonic() < self._retry_at
            if self._pending_loss is not None and retry_later and not ended:
                for entry in entries:
                    self._lose(entry)
                return
            if entries or (self.file is not None and self.file.size == 0):
                self._write(entries)
            if ended and not self.complete and self._pending_loss is not None:
                # The session is over: one last try to mark the gap and the end,
                # which are small and may fit where the failed batch was cut away.
                self._write([entries[-1]])
            if ended:
                self.finished = True
        finally:
            self.buffer.written()

    def abandon(self) -> None:
        """Stop without the END record (the recorder is shutting down)."""
        for entry in self.buffer.stop_accepting():
            release(entry)
        self.finished = True

    def report(self) -> None:
        """The recording's last word in the log: what it lacks, if anything."""
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
        if self.file is not None and not self.complete:
            log.warning(
                "session %s: recording %s has no END record (see the errors above)",
                self.session_id,
                self.path,
            )

    # -- internals ------------------------------------------------------------------------

    def _create(self) -> bool:
        try:
            self.file = RecordingFile(self.path)
        except OSError as exc:
            log.error(
                "session %s: cannot create recording %s: %s; this session is not recorded",
                self.session_id,
                self.path,
                exc.strerror or exc,
            )
            self.abandon()
            return False
        return True

    def _write(self, entries: list[Entry]) -> None:
        """Write a batch, preceded by the META record while the file is still empty and
        by the GAP record of earlier losses if there are any."""
        file = self.file
        assert file is not None
        loss = self._pending_loss
        gap = loss.entry() if loss is not None else None
        head = [self.meta] if file.size == 0 else []
        batch = [*head, *([gap] if gap is not None else []), *entries]
        done, error = file.append(batch)
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
        self._retry_at = time.monotonic() + RETRY_INTERVAL

    def _lose(self, entry: Entry) -> None:
        """Count an entry that will not reach the file."""
        assert self._pending_loss is not None
        release(entry)
        self._pending_loss.absorb(entry)
        kind, flags, time_us, payload = entry
        if kind not in (Kind.GAP, Kind.META, Kind.END):  # GAPs were counted when dropped
            self.lost.add(flags, time_us, len(payload))
            self.lost.reason = self.lost.reason or self._pending_loss.reason


#: How much lower than the rest of the process the recording thread runs (nice values).
BACKGROUND_NICE = 19


def _yield_to_the_relay() -> None:
    """Lower the calling thread's CPU priority as far as Linux allows.

    Recording is background work: when the relay and the writer compete for a core
    (a bulk session on a busy or single-core machine), the relay must win, and the
    recording falls behind, drops frames and marks the gap, as designed. With a core
    to spare the thread gets it all the same. (On Linux ``setpriority`` with a thread
    id applies to that thread alone; raising one's nice value needs no privilege.)
    """
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)


class RecordingThread:
    """The thread that writes every recording of one recorder.

    Sessions' buffers signal it through :attr:`condition`; it takes each ready
    session's records in turn. ``on_finished(writer)`` is called from this thread when
    a recording needs nothing more from it (its file is still open: the caller syncs
    and closes it, see :meth:`finish_file`).
    """

    def __init__(self, on_finished: Callable[[SessionWriter], None]) -> None:
        self.condition = threading.Condition()
        self._on_finished = on_finished
        self._ready: dict[SessionWriter, None] = {}  # insertion-ordered set
        self._writers: set[SessionWriter] = set()
        self._urgent = False
        self._stopping = False
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="trio-bridge recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, writer: SessionWriter) -> None:
        """Take on a new session's recording; its META record is written at once."""
        with self.condition:
            self._writers.add(writer)
            self.ready(writer, urgent=True)

    def ready(self, writer: SessionWriter, urgent: bool) -> None:
        """``writer`` has records queued (called with :attr:`condition` held)."""
        self._ready[writer] = None
        if urgent:
            self._urgent = True
        self.condition.notify()

    def stop(self, abandon: bool) -> None:
        """Finish: with ``abandon``, leave unfinished recordings without their END."""
        with self.condition:
            self._stopping = True
            self._abandon = self._abandon or abandon
            self.condition.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (blocking); False if it is still busy after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @staticmethod
    def finish_file(writer: SessionWriter) -> None:
        """Sync (when complete) and close a finished recording; blocks, so call it in a
        worker thread."""
        if writer.file is not None:
            writer.file.close(sync=writer.complete)
        writer.report()

    def _run(self) -> None:
        _yield_to_the_relay()
        while True:
            with self.condition:
                while not self._ready and not self._stopping:
                    self.condition.wait()
                if self._abandon or (self._stopping and not self._ready):
                    break
                if not self._urgent:
                    # Let small frames gather: one wake-up per batch, not per frame.
                    self.condition.wait(FLUSH_DELAY)
                ready, self._ready = list(self._ready), {}
                self._urgent = False
            for writer in ready:
                self._write(writer)
        with self.condition:
            left = list(self._writers)
            self._writers.clear()
        for writer in left:
            writer.abandon()
            self._on_finished(writer)

    def _write(self, writer: SessionWriter) -> None:
        try:
            writer.write_pending()
        except Exception:  # a bug must not end the recording of every other session
            log.exception("session %s: recording failed", writer.session_id)
            writer.abandon()
        if writer.finished:
            with self.condition:
                handed_off = writer not in self._writers  # a put after its END, say
                self._writers.discard(writer)
            if not handed_off:
                self._on_finished(writer)
