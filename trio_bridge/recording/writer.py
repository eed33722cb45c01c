"""Writing recordings: one thread for all of a recorder's files, fed by the sessions' buffers.

Why a thread: regular files have no non-blocking mode (``O_NONBLOCK`` is ignored and
epoll reports them always ready), so a slow or stalled disk would stall the whole
event loop, and every session with it, if the writes ran there.

Why one long-lived thread rather than ``trio.to_thread`` per batch: a hand-off through
the event loop costs a few scheduling rounds of a busy loop (measured: ~10 ms per
batch while a session relays 1 GiB/s), which capped the recorder at about a third
of a bulk session's rate. The thread instead waits on a condition that the buffers
signal directly, takes every ready session's records and writes each session's batch
at once: a small one with one ``pwritev`` through the page cache, a large one staged
and written with O_DIRECT (see :class:`RecordingFile`); target data held in pipes is
spliced or read from its pipe into the file.

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
import ctypes
import errno
import logging
import mmap
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
from .relay_first import RelayFirst

log = logging.getLogger("trio_bridge.recording")

RETRY_INTERVAL = 1.0
IOV_MAX = 1024

#: O_DIRECT needs buffers, lengths and file offsets aligned to the device's logical
#: block size; 4096 covers every common device.
BLOCK = 4096
#: The recording thread's staging buffer for O_DIRECT writes (one per recorder).
STAGING_SIZE = 4 << 20
#: Batches smaller than this go through the page cache (interactive sessions).
DIRECT_MIN = 256 << 10


#: Copies into the staging buffer at least this large are made without the GIL.
UNLOCKED_COPY = 16 << 10


class StagingBuffer:
    """Page-aligned memory (an anonymous mmap) in which O_DIRECT writes are assembled."""

    def __init__(self, size: int = STAGING_SIZE) -> None:
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self._anchor = ctypes.c_char.from_buffer(self._map)  # pins the mapping
        self._address = ctypes.addressof(self._anchor)

    def __len__(self) -> int:
        return len(self.view)

    def copy_in(self, at: int, data: bytes, start: int, length: int) -> None:
        """Copy ``data[start:start + length]`` to offset ``at``.

        Large copies go through ``ctypes.memmove``, which releases the GIL (a slice
        assignment holds it): a 64 KiB copy holding the GIL is time the relay thread
        cannot run, once per frame.
        """
        if length >= UNLOCKED_COPY:
            source = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
            assert source is not None
            ctypes.memmove(self._address + at, source + start, length)
        else:
            self.view[at : at + length] = memoryview(data)[start : start + length]


class RecordingFile:
    """An append-only recording on disk; every method blocks, so call them in a thread.

    With a ``staging`` buffer, large batches are written with O_DIRECT: the bytes go
    from the staging buffer to the device without a page-cache copy. Measured on the
    development VM, buffered writes of fresh page-cache pages cost 1.3-1.9 s of kernel
    CPU per GiB (0.2 s when the pages are warm); O_DIRECT costs under 0.1 s, which is
    what lets a recording keep up with a bulk session without taking the relay's CPU.
    The partial blocks at either end of a batch are written through the page cache,
    so the file always ends exactly after its last complete record (readable while
    written, nothing held back if the process is killed) and a block holding records
    already written is never written again. Where the file system refuses O_DIRECT or
    a write with it, the file is written through the page cache.
    """

    def __init__(self, path: Path, staging: StagingBuffer | None = None) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self._direct_fd: int | None = None
        self._staging = staging
        if staging is not None and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # EINVAL: no O_DIRECT on this file system
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.size = 0  # bytes of complete records (and prelude) in the file
        #: Set when a failed batch could not be cut away: nothing more is appended, so
        #: the file still reads up to its last complete record.
        self.unusable: OSError | None = None

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def append(self, entries: Sequence[Entry]) -> tuple[int, OSError | None]:
        """Write ``entries`` after the last complete record.

        Returns how many were written completely and the error that stopped the rest,
        if any; after an error the file is cut back to its last complete record. Pipe
        chunks are consumed either way: emptied into the file, or discarded.
        """
        if self.unusable is not None:
            for entry in entries:
                release(entry)
            return 0, self.unusable
        sink = self._sink_for(entries)
        try:
            if self.size == 0:
                sink.add(encode_prelude(), None)
            for index, (kind, flags, time_us, payload) in enumerate(entries):
                sink.add(encode_header(kind, flags, time_us, len(payload)), None)
                if isinstance(payload, PipeChunk):
                    sink.add_pipe(payload, index)
                else:
                    sink.add(payload, index)
            sink.finish()
        except OSError as exc:
            try:
                os.ftruncate(self._fd, sink.committed)
            except OSError as cut:
                self.unusable = OSError(cut.errno, f"cannot cut the file back: {cut.strerror}")
            self.size = sink.committed
            for entry in entries[sink.done :]:
                release(entry)
            return sink.done, exc
        finally:
            if isinstance(sink, _StagedSink) and sink.direct_refused:
                self._stop_direct()
        self.size = sink.committed
        return len(entries), None

    def close(self, sync: bool) -> None:
        """Sync (if asked) and close; errors are logged, never raised (the file is done)."""
        self._stop_direct()
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            log.error("cannot sync recording %s: %s", self.path, exc.strerror or exc)
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # NFS reports late write errors here
                log.error("closing recording %s failed: %s", self.path, exc.strerror or exc)

    def _sink_for(self, entries: Sequence[Entry]) -> _Sink:
        if self._direct_fd is not None and self._staging is not None:
            size = sum(len(payload) for *_, payload in entries)
            if size >= DIRECT_MIN:
                return _StagedSink(self._fd, self._direct_fd, self._staging, self.size)
        return _VectorSink(self._fd, self.size)

    def _stop_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Sink:
    """Bytes on their way into a file, and which records they complete.

    ``committed`` is the end of the last record entirely in the file and ``done`` the
    number of entries it completes: after an error the file is cut back there.
    """

    def __init__(self, position: int) -> None:
        self.committed = position
        self.done = 0
        self._ends: deque[tuple[int, int]] = deque()  # (entry index, end offset) pending

    def add(self, data: bytes, completes: int | None) -> None:
        raise NotImplementedError

    def add_pipe(self, chunk: PipeChunk, completes: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def _pending_end(self, completes: int | None, end: int) -> None:
        if completes is not None:
            self._ends.append((completes, end))

    def _written_to(self, position: int) -> None:
        """Everything before ``position`` is in the file."""
        while self._ends and self._ends[0][1] <= position:
            index, end = self._ends.popleft()
            self.done, self.committed = index + 1, end


class _VectorSink(_Sink):
    """Through the page cache: ``pwritev`` of the Python buffers, ``splice`` from pipes."""

    def __init__(self, fd: int, position: int) -> None:
        super().__init__(position)
        self._fd = fd
        self._position = position  # where the next write goes
        self._queued_to = position
        self._buffers: deque[memoryview] = deque()

    def add(self, data: bytes, completes: int | None) -> None:
        if data:
            self._buffers.append(memoryview(data))
            self._queued_to += len(data)
        self._pending_end(completes, self._queued_to)
        if len(self._buffers) >= IOV_MAX:
            self._write()

    def add_pipe(self, chunk: PipeChunk, completes: int) -> None:
        self._write()
        left = chunk.length
        try:
            while left:
                moved = os.splice(chunk.read_end, self._fd, left, offset_dst=self._position)
                if moved == 0:
                    raise OSError(0, "the recording pipe ran dry")
                self._position += moved
                left -= moved
        except BaseException:
            chunk.discard()
            raise
        chunk.emptied()
        self._queued_to = self._position
        self._pending_end(completes, self._position)
        self._written_to(self._position)

    def finish(self) -> None:
        self._write()

    def _write(self) -> None:
        while self._buffers:
            n = os.pwritev(self._fd, list(islice(self._buffers, IOV_MAX)), self._position)
            if n == 0:
                raise OSError(errno.EIO, "the file took no bytes")
            self._position += n
            _consume(self._buffers, n)
            self._written_to(self._position)


class _StagedSink(_Sink):
    """Assembled in an aligned staging buffer, written in whole blocks with O_DIRECT.

    Bytes sit in the buffer at their offset within the file's 4 KiB blocks (the
    buffer's start stands for the block that holds ``position``), so every O_DIRECT
    write starts on a block boundary both in the file and in memory. The partial
    block at the start (it holds records already in the file) and the one at the end
    are written through the page cache: a block holding written records is never
    written again, so a failing device cannot damage what the file already has.
    """

    def __init__(self, fd: int, direct_fd: int, staging: StagingBuffer, position: int) -> None:
        super().__init__(position)
        self._fd = fd
        self._direct_fd = direct_fd
        self._staging = staging
        self._stage = staging.view
        self._file_at = position - position % BLOCK  # the file offset stage[0] stands for
        self._lead = position % BLOCK  # stage[:lead] stands for bytes already in the file
        self._fill = self._lead
        self.direct_refused = False

    def add(self, data: bytes, completes: int | None) -> None:
        start = 0
        while start < len(data):
            room = len(self._stage) - self._fill
            if not room:
                self._write_blocks()
                continue
            length = min(room, len(data) - start)
            self._staging.copy_in(self._fill, data, start, length)
            self._fill += length
            start += length
        self._pending_end(completes, self._file_at + self._fill)

    def add_pipe(self, chunk: PipeChunk, completes: int) -> None:
        left = chunk.length
        try:
            while left:
                room = len(self._stage) - self._fill
                if not room:
                    self._write_blocks()
                    continue
                target = self._stage[self._fill : self._fill + min(room, left)]
                got = os.readv(chunk.read_end, [target])
                if got == 0:
                    raise OSError(0, "the recording pipe ran dry")
                self._fill += got
                left -= got
        finally:
            # Read out, or broken: either way the pipe is done with. The bytes now live
            # in the staging buffer (or are lost with the batch if a write fails).
            if left:
                chunk.discard()
            else:
                chunk.emptied()
        self._pending_end(completes, self._file_at + self._fill)

    def finish(self) -> None:
        self._write_blocks()
        if self._fill > self._lead:
            partial = self._stage[self._lead : self._fill]
            _write_all(self._fd, partial, self._file_at + self._lead)
            self._written_to(self._file_at + self._fill)
            self._file_at += self._fill
            self._lead = self._fill = 0

    def _write_blocks(self) -> None:
        blocks = self._fill - self._fill % BLOCK
        if not blocks:
            return
        direct_from = 0
        if self._lead:
            _write_all(self._fd, self._stage[self._lead : BLOCK], self._file_at + self._lead)
            self._written_to(self._file_at + BLOCK)
            direct_from, self._lead = BLOCK, 0
        if blocks > direct_from:
            self._write_direct(self._stage[direct_from:blocks], self._file_at + direct_from)
        self._file_at += blocks
        self._stage[: self._fill - blocks] = self._stage[blocks : self._fill]
        self._fill -= blocks
        self._written_to(self._file_at)

    def _write_direct(self, data: memoryview, offset: int) -> None:
        if not self.direct_refused:
            try:
                _write_all(self._direct_fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_refused = True  # an alignment the device does not take
        _write_all(self._fd, data, offset)


def _write_all(fd: int, data: memoryview, offset: int) -> int:
    written = 0
    while written < len(data):
        n = os.pwrite(fd, data[written:], offset + written)
        if n == 0:
            raise OSError(errno.EIO, "the file took no bytes")
        written += n
    return written


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

    def write_pending(self, staging: StagingBuffer | None = None) -> None:
        """Write what the session queued; sets :attr:`finished` after its END record.

        ``staging``: the thread's buffer for O_DIRECT writes (see :class:`RecordingFile`).
        """
        if self.finished:
            return
        if self.file is None and not self._create(staging):
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
            # Whatever went wrong, no pipe outlives its batch (releasing is idempotent:
            # chunks already written or released are left alone).
            for entry in entries:
                release(entry)
            self.buffer.written()

    def abandon(self) -> None:
        """Stop without the END record (the recorder is shutting down)."""
        for entry in self.buffer.stop_accepting():
            release(entry)
        self.finished = True

    def finish(self, sync: bool = True) -> None:
        """Sync (when complete) and close the file, and say what it lacks; blocks, so
        the recorder calls it in a worker thread, after :attr:`finished`."""
        if self.file is not None:
            self.file.close(sync=sync and self.complete)
        self.report()

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

    def _create(self, staging: StagingBuffer | None) -> bool:
        try:
            self.file = RecordingFile(self.path, staging)
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
        """Count an entry that will not reach the file (its pipe, if any, is released
        with the rest of the batch by :meth:`write_pending`)."""
        assert self._pending_loss is not None
        self._pending_loss.absorb(entry)
        kind, flags, time_us, payload = entry
        if kind not in (Kind.GAP, Kind.META, Kind.END):  # GAPs were counted when dropped
            self.lost.add(flags, time_us, len(payload))
            self.lost.reason = self.lost.reason or self._pending_loss.reason


class RecordingThread:
    """The thread that writes every recording of one recorder.

    Sessions' buffers signal it through :attr:`condition`; it takes each ready
    session's records in turn. ``on_finished(writer)`` is called from this thread when
    a recording needs nothing more from it (its file is still open: the caller syncs
    and closes it, see :meth:`SessionWriter.finish`).
    """

    def __init__(
        self, on_finished: Callable[[SessionWriter], None], loop_thread_id: int | None = None
    ) -> None:
        self.condition = threading.Condition()
        # The event loop's thread: while it is CPU-bound the writer backs off.
        self._relay_first = RelayFirst(loop_thread_id) if loop_thread_id is not None else None
        self._on_finished = on_finished
        self._ready: dict[SessionWriter, None] = {}  # insertion-ordered set
        self._writers: set[SessionWriter] = set()
        self._urgent = False
        self._stopping = False
        self._abandon = False
        self._staging: StagingBuffer | None = None  # allocated by the thread itself
        self._thread = threading.Thread(target=self._run, name="trio-bridge recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, writer: SessionWriter) -> bool:
        """Take on a new session's recording (its META record is written at once);
        False once the thread is stopping."""
        with self.condition:
            if self._stopping:
                return False
            self._writers.add(writer)
            self.ready(writer, urgent=True)
            return True

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
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # a bug here must not leave every session's buffer unserved
            log.exception("the recording thread failed; open recordings end here")
        finally:
            with self.condition:
                self._stopping = True
                left = list(self._writers)
                self._writers.clear()
            for writer in left:
                try:
                    writer.abandon()
                finally:
                    self._on_finished(writer)

    def _serve(self) -> None:
        try:
            self._staging = StagingBuffer()
        except OSError as exc:  # ENOMEM: write through the page cache instead
            log.warning("no staging buffer for O_DIRECT writes (%s)", exc.strerror or exc)
        while True:
            with self.condition:
                while not self._ready and not self._stopping:
                    self.condition.wait()
                if self._abandon or (self._stopping and not self._ready):
                    return
                if not self._urgent:
                    # Let small frames gather: one wake-up per batch, not per frame.
                    self.condition.wait(FLUSH_DELAY)
                ready, self._ready = list(self._ready), {}
                self._urgent = False
            started = time.thread_time()
            for writer in ready:
                self._write(writer)
            if self._relay_first is not None:
                pause = self._relay_first.pause_after(time.thread_time() - started)
                if pause:
                    time.sleep(pause)

    def _write(self, writer: SessionWriter) -> None:
        try:
            writer.write_pending(self._staging)
        except Exception:  # a bug must not end the recording of every other session
            log.exception("session %s: recording failed", writer.session_id)
            writer.abandon()
        if writer.finished:
            with self.condition:
                handed_off = writer not in self._writers  # a put after its END, say
                self._writers.discard(writer)
            if not handed_off:
                self._on_finished(writer)
