"""Writing one session's recording: blocking file I/O, run in the recorder's writing thread.

Why a thread: regular files have no non-blocking mode (``O_NONBLOCK`` is ignored and
epoll reports them always ready), so a slow or stalled disk would stall the event
loop, and every session with it, if the writes ran there. The recorder's writing thread
calls these methods (see :mod:`.recorder`); they block and never touch Trio.

Writes go through the page cache (one ``pwritev`` per batch) and the file is synced
when it is complete: crash safety comes from the format (a cut file reads to its last
complete record), not from syncing every write. Every 32 MiB the written part is also
synced and dropped from the page cache, beside the writes (:meth:`RecordingFile.drop_behind`).

Failure policy: a write error (disk full, quota, file too large, I/O error) cuts the
file back to the end of its last complete record, so it stays readable, and what could
not be written is counted. The writer retries at most once per :data:`RETRY_INTERVAL`;
the first write that succeeds again starts with a GAP record holding the counts. When
the session ends, GAP and END must be in the file: if they do not fit (a disk that
stays full), the last records are cut away, and counted in the GAP, until they do.
The session is never affected.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from .buffer import Entry, Loss
from .format import HEADER_SIZE, PRELUDE, GapRecord, Kind, encode_header, encode_prelude

log = logging.getLogger("trio_bridge.recording")

RETRY_INTERVAL = 1.0
IOV_MAX = 1024
#: Records remembered at the end of a file, to be cut away when GAP and END do not fit.
CUTTABLE = 256
#: Every this many bytes the written part of a file is synced and dropped from the
#: page cache (see :meth:`RecordingFile.drop_behind`).
DROP_BEHIND = 32 << 20


class RecordingFile:
    """An append-only recording on disk; every method blocks, so call them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self.size = 0  # bytes of complete records (and prelude) in the file
        #: Set when a failed batch could not be cut away: nothing more is appended, so
        #: the file still reads up to its last complete record.
        self.unusable: OSError | None = None
        #: The last records, newest last, as (offset, kind, flags, time_us, length,
        #: GAP payload): what :meth:`cut_last` may take back.
        self._tail: deque[tuple[int, int, int, int, int, bytes]] = deque(maxlen=CUTTABLE)
        self._dropped_to = 0  # the page cache holds nothing of the file before this

    @property
    def drop_due(self) -> bool:
        return self.size - self._dropped_to >= DROP_BEHIND and self.unusable is None

    def drop_behind(self) -> None:
        """Sync what was written and drop it from the page cache.

        Runs in a thread of its own beside the file's writes (the recorder starts it
        when :attr:`drop_due`), so a slow sync delays no write.

        The bridge never reads a recording back, and pages it leaves cached make every
        later write take fresh ones: on the development VM a fresh page-cache page cost
        2.4 s of kernel CPU per GiB written, a recycled one 0.33 s (sync included),
        which decides whether a 200 MiB/s recording fits beside its relay on one core.
        A failure here is only logged: the data is in the page cache all the same.
        """
        size = self.size
        try:
            os.fdatasync(self._fd)
            os.posix_fadvise(self._fd, 0, size, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.warning("cannot sync recording %s: %s", self.path, exc.strerror or exc)
        self._dropped_to = size

    def append(self, entries: Sequence[Entry]) -> tuple[int, OSError | None]:
        """Write ``entries`` after the last complete record.

        Returns how many were written completely and the error that stopped the rest,
        if any; after an error the file is cut back to its last complete record. The
        per-record work is kept small (a bulk session writes ~40,000 records a second
        here, and this runs holding the GIL between system calls).
        """
        if self.unusable is not None:
            return 0, self.unusable
        start = self.size
        buffers = [encode_prelude()] if start == 0 else []
        for kind, flags, time_us, payload in entries:
            buffers += (encode_header(kind, flags, time_us, payload), payload)
        position = start
        try:
            for first in range(0, len(buffers), IOV_MAX):
                position = _write_all(self._fd, buffers[first : first + IOV_MAX], position)
        except OSError as exc:
            done, offset = 0, start + (PRELUDE.size if start == 0 else 0)
            for kind, flags, time_us, payload in entries:
                end = offset + HEADER_SIZE + len(payload)
                if end > position:
                    break
                self._remember(offset, kind, flags, time_us, payload)
                done, offset = done + 1, end
            self._cut(offset if done else start)
            return done, exc
        self.size = position
        # The last records, for cut_last: offsets counted back from the end.
        offset = position
        recent = entries[-CUTTABLE:]
        offsets = []
        for *_, payload in reversed(recent):
            offset -= HEADER_SIZE + len(payload)
            offsets.append(offset)
        for (kind, flags, time_us, payload), offset in zip(recent, reversed(offsets), strict=True):
            self._remember(offset, kind, flags, time_us, payload)
        return len(entries), None

    def _remember(self, offset: int, kind: int, flags: int, time_us: int, payload: bytes) -> None:
        gap = payload if kind == Kind.GAP else b""
        self._tail.append((offset, kind, flags, time_us, len(payload), gap))

    def cut_last(self) -> tuple[int, int, int, int, bytes] | None:
        """Cut the last record away (never META): its (kind, flags, time_us, length,
        GAP payload), or None when no record is left that may go."""
        if not self._tail or self._tail[-1][1] == Kind.META or self.unusable is not None:
            return None
        offset, kind, flags, time_us, length, gap = self._tail.pop()
        self._cut(offset)
        return kind, flags, time_us, length, gap

    def close(self, sync: bool) -> None:
        """Sync (if asked) and close; errors are logged, never raised (the file is done)."""
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

    def _cut(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as cut:
            self.unusable = OSError(cut.errno, f"cannot cut the file back: {cut.strerror}")
        self.size = size


def _write_all(fd: int, buffers: list[bytes], position: int) -> int:
    """``pwritev`` the buffers at ``position`` (another call after a short write); the
    position after them."""
    n = os.pwritev(fd, buffers, position)
    total = sum(map(len, buffers))
    if n == total:
        return position + n
    pending = deque(memoryview(b) for b in buffers)
    while True:
        if n == 0:
            raise OSError(errno.EIO, "the file took no bytes")
        position, total = position + n, total - n
        if not total:
            return position
        while n:  # drop what was written
            head = pending[0]
            if len(head) <= n:
                n -= len(head)
                pending.popleft()
            else:
                pending[0], n = head[n:], 0
        n = os.pwritev(fd, list(pending), position)


class SessionWriter:
    """One session's recording as the writing thread sees it: its file and what it lacks.

    Its methods block; the recorder's writing thread calls them, one at a time.
    """

    def __init__(self, session_id: str, path: Path, meta: Entry) -> None:
        self.session_id = session_id
        self.path = path
        self.meta = meta  # written first, whenever the first write succeeds
        self.file: RecordingFile | None = None
        self.finished = False  # nothing more will be written
        self.complete = False  # the END record is in the file
        self.lost = Loss(0, 0, "")  # events lost to write errors, over the session
        self._pending: Loss | None = None  # lost and not yet marked in the file
        self._reported = (0, 0)  # frames and bytes in _pending already reported as gaps
        self._retry_at = 0.0

    def write(self, entries: list[Entry]) -> list[tuple[int, int]]:
        """Write a batch; the frames and bytes of each gap newly marked in the file.

        A batch that ends with the END record finishes the recording: the GAP of
        earlier losses and the END are then made to fit, cutting records if need be.
        """
        if self.finished:
            return []
        if self.file is None and not self._create():
            return []
        gaps: list[tuple[int, int]] = []
        ended = bool(entries) and entries[-1][0] == Kind.END
        if self._pending is not None and time.monotonic() < self._retry_at and not ended:
            for entry in entries:
                self._lose(*entry)
            return gaps
        self._append(entries, gaps)
        if ended:
            self.finished = True
            if not self.complete:
                self._end(entries[-1], gaps)
        return gaps

    def abandon(self) -> None:
        """Stop without the END record (the recorder is shutting down)."""
        self.finished = True

    def finish(self) -> None:
        """Sync (when complete) and close the file; blocks (call it in a thread)."""
        if self.file is not None:
            self.file.close(sync=self.complete)

    def report(self, dropped: Loss) -> None:
        """The recording's last word in the log: what it lacks, if anything.

        ``dropped``: what the session's buffer dropped (:attr:`EventBuffer.dropped`).
        """
        failed = self.lost
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
            self.finished = True
            return False
        return True

    def _append(self, entries: list[Entry], gaps: list[tuple[int, int]]) -> None:
        """Write a batch, preceded by the META record while the file is still empty and
        by the GAP record of earlier losses if there are any."""
        file = self.file
        assert file is not None
        loss = self._pending
        gap = loss.entry() if loss is not None else None
        batch = [*([self.meta] if file.size == 0 else []), *([gap] if gap else []), *entries]
        done, error = file.append(batch)
        for entry in batch[:done]:
            if entry[0] == Kind.GAP:
                record = GapRecord.decode(entry[2], entry[3], -1)
                frames, size = record.total_frames, record.total_bytes
                if entry is gap:
                    frames, size = frames - self._reported[0], size - self._reported[1]
                    self._pending, self._reported = None, (0, 0)
                    log.warning(
                        "session %s: recording resumed; gap of %d frames (%d bytes) marked in %s",
                        self.session_id,
                        record.total_frames,
                        record.total_bytes,
                        self.path,
                    )
                gaps.append((frames, size))
        if error is None:
            self.complete = bool(batch) and batch[-1][0] == Kind.END
            return
        if self._pending is None:
            first_us = batch[done][2]
            self._pending = Loss(first_us, first_us, f"write failed: {error.strerror or error}")
            log.error(
                "session %s: cannot write recording %s: %s; the session goes on, "
                "unrecorded events are counted and the gap will be marked if the disk allows",
                self.session_id,
                self.path,
                error.strerror or error,
            )
        for entry in batch[done:]:
            if entry is not gap and entry is not self.meta:
                self._lose(*entry)
        self._retry_at = time.monotonic() + RETRY_INTERVAL

    def _end(self, end: Entry, gaps: list[tuple[int, int]]) -> None:
        """Make room for the GAP and END records by cutting the last records away (they
        join the gap): a disk that stays full still ends the file with both."""
        file = self.file
        assert file is not None
        while True:
            self._append([end], gaps)
            if self.complete:
                return
            cut = file.cut_last()
            if cut is None:
                log.error(
                    "session %s: recording %s ends without its GAP and END records: no room "
                    "for them on the disk",
                    self.session_id,
                    self.path,
                )
                pending = self._pending
                if pending is not None:  # the losses count all the same, unmarked
                    frames, size = self._reported
                    gaps.append((pending.total_frames - frames, pending.total_bytes - size))
                return
            kind, flags, time_us, length, gap = cut
            assert self._pending is not None
            if kind == Kind.GAP:  # reported when written: it joins the next one
                old = GapRecord.decode(time_us, gap, -1)
                self._pending.merge(old)
                frames, size = self._reported
                self._reported = (frames + old.total_frames, size + old.total_bytes)
            else:
                self._pending.add(flags, time_us, length)
                self.lost.add(flags, time_us, length)
            self._pending.add_reason("records cut to make room for this GAP and the END")

    def _lose(self, kind: int, flags: int, time_us: int, payload: bytes) -> None:
        """Count a record that will not reach the file."""
        assert self._pending is not None
        self._pending.absorb(kind, flags, time_us, payload)
        if kind not in (Kind.GAP, Kind.META, Kind.END):  # GAPs were counted when dropped
            self.lost.add(flags, time_us, len(payload))
            self.lost.reason = self.lost.reason or self._pending.reason
