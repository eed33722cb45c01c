"""The session recorder: an :class:`~trio_bridge.observe.ObserverFactory` writing one file
per session.

::

    recorder = Recorder("recordings")
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)          # checks the folder, hosts the writing
        bridge = await nursery.start(Bridge(config, observers=recorder).serve)
        ...
    # or: async with open_recorder("recordings") as recorder: ...

Each session gets a :class:`SessionRecorder` (the observer, called synchronously by the
relay), which queues records in a bounded
:class:`~trio_bridge.recording.buffer.EventBuffer`, and a task in the recorder's nursery
that hands each batch to a worker thread
(:class:`~trio_bridge.recording.writer.SessionWriter`), so the relay never waits for
the disk. The threads come from Trio's pool, one batch at a time for the whole recorder
(a dedicated :class:`trio.CapacityLimiter`): a bridge's recordings share one disk, and
a busy VNC session writes 1-10 MB/s. Everything is recorded unless the disk falls
behind a session by a whole buffer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from websockets.frames import Frame

from .. import __version__
from ..config import Config, StartupError
from ..observe import Direction, SessionInfo
from .buffer import Entry, EventBuffer
from .format import FILE_SUFFIX, EndRecord, Kind, Meta, frame_flags
from .writer import SessionWriter

log = logging.getLogger("trio_bridge.recording")

DEFAULT_BUFFER_LIMIT = 8 << 20  # per session
DEFAULT_DRAIN_TIMEOUT = 10.0
#: The writing task hands over a batch at once when this much is queued; with less it
#: waits :data:`FLUSH_DELAY` first, so that a session of small messages costs one
#: hand-off to the worker thread per batch rather than per frame.
BATCH_BYTES = 256 << 10
FLUSH_DELAY = 0.005
#: The most a batch takes from a session's buffer (it counts against the buffer until
#: written): a quarter of the default buffer keeps room for what arrives meanwhile.
BATCH_MAX = 2 << 20

#: ``on_gap(frames, bytes)``: called on the Trio thread for each gap marked in a recording.
GapCallback = Callable[[int, int], None]


class RecordingFolderError(StartupError):
    """The recording folder is missing or not writable (the CLI exits 1 with this line)."""


def check_folder(folder: Path) -> Path:
    """The folder, made absolute, after proving a file can be created in it.

    A real probe file rather than ``os.access``: root passes every permission check
    but still cannot write to a read-only or full file system.
    """
    if not folder.exists():
        raise RecordingFolderError(
            f"cannot record sessions: folder {folder} does not exist (create it first)"
        )
    if not folder.is_dir():
        raise RecordingFolderError(f"cannot record sessions: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".trio-bridge-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            problem = f"folder {folder} is not writable ({reason})"
        else:  # e.g. /proc: ENOENT for a folder that exists, the kernel's way of saying no
            kind = file_system_type(folder)
            on = f": it is on a {kind} file system, which does not allow it" if kind else ""
            problem = f"cannot create files in {folder}{on} ({reason}); choose a folder on a disk"
        raise RecordingFolderError(f"cannot record sessions: {problem}") from None
    return folder.resolve()


def file_system_type(folder: Path) -> str | None:
    """The type of the file system holding ``folder`` (``proc``, ``sysfs``, ``ext4``...),
    from the longest mount point above it in /proc/self/mountinfo; None if unknown."""
    path = str(folder.resolve())
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                mount = fields[4].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return None
    return kind


_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")


def _name_part(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")[:80] or "unknown"


def recording_name(info: SessionInfo) -> str:
    """``<UTC start>_<session id>_<client>_<target>.tbrec``: sorting by name sorts by time.

    Addresses are reduced to letters, digits, dots and dashes
    (``127.0.0.1:5900`` -> ``127.0.0.1-5900``); the META record has them exactly.
    """
    stamp = datetime.fromtimestamp(info.started_wall, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    parts = (stamp, _name_part(info.session_id), _name_part(info.client), _name_part(info.target))
    return "_".join(parts) + FILE_SUFFIX


def options_from_config(config: Config) -> dict[str, Any]:
    """The bridge settings worth keeping with a recording (META ``options``)."""
    return {
        "compression": config.compression,
        "limits": dataclasses.asdict(config.limits),
    }


class SessionRecorder:
    """The observer of one session: turns frames into queued records, never blocks."""

    def __init__(self, info: SessionInfo, path: Path, buffer: EventBuffer) -> None:
        self.info = info
        self.path = path
        self.buffer = buffer
        self._t0 = time.monotonic_ns()
        self._warned = False

    def _now_us(self) -> int:
        return (time.monotonic_ns() - self._t0) // 1000

    def on_frame(self, direction: Direction, frame: Frame) -> None:
        data = frame.data
        if type(data) is not bytes:
            data = bytes(data)  # the relay may reuse its buffer once we return
        flags = frame_flags(direction, frame.fin)
        if not self.buffer.put(int(frame.opcode), flags, self._now_us(), data) and not self._warned:
            # The first loss of a session is worth a line; the counts come at its end.
            self._warned = True
            log.warning(
                "session %s: recording buffer full (%d bytes): dropping events until the "
                "disk catches up; the gap is marked in %s",
                self.info.session_id,
                self.buffer.limit,
                self.path,
            )

    def on_end(self, close_code: int | None, close_reason: str, closed_by: str) -> None:
        end = EndRecord(self._now_us(), close_code, close_reason, closed_by)
        self.buffer.close((Kind.END, 0, end.time_us, end.encode()))


class Recorder:
    """Records every session of a bridge to its own file in ``folder``.

    ``run()`` must be running (in a nursery) while sessions open; it returns after
    :meth:`close` once every recording is written, or ``drain_timeout`` later.
    ``on_gap(frames, bytes)`` is called (on the Trio thread) each time a GAP record is
    written, with the frames and payload bytes it newly marks as missing, and once for
    losses a recording had to end without marking (a disk with no room even for them).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        options: Mapping[str, Any] | None = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        on_gap: GapCallback | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.options = dict(options or {})
        self.buffer_limit = buffer_limit
        self.drain_timeout = drain_timeout
        self.on_gap = on_gap
        #: Recordings whose writing is done (complete, or given up on), in the order
        #: they finished.
        self.finished: list[Path] = []
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)  # one batch written at a time
        self._writing = 0  # sessions whose recording is not finished
        self._closing = trio.Event()
        self._changed = trio.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[Recorder] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check the folder (raising :class:`RecordingFolderError`), then host the writing."""
        self.folder = await trio.to_thread.run_sync(check_folder, self.folder)
        log.info("recording sessions to %s", self.folder)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await self._closing.wait()
                with trio.move_on_after(self.drain_timeout):
                    while self._writing:
                        await self._wait_change()
                if self._writing:
                    log.warning(
                        "%d recording(s) still being written after %g s; stopping them",
                        self._writing,
                        self.drain_timeout,
                    )
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    def close(self) -> None:
        """Finish: ``run()`` returns when the open recordings are written."""
        self._closing.set()

    def open(self, info: SessionInfo) -> SessionRecorder | None:
        if self._nursery is None or self._closing.is_set():
            why = "is stopping" if self._closing.is_set() else "is not running"
            log.warning("session %s: not recorded: the recorder %s", info.session_id, why)
            return None
        path = self.folder / recording_name(info)
        meta = Meta(
            session_id=info.session_id,
            client=info.client,
            target=info.target,
            path=info.path,
            subprotocol=info.subprotocol,
            started=info.started_wall,
            options=self.options,
            writer=f"trio-bridge {__version__}",
        )
        buffer = EventBuffer(self.buffer_limit)
        writer = SessionWriter(info.session_id, path, (Kind.META, 0, 0, meta.encode()))
        self._writing += 1
        self._nursery.start_soon(self._write_session, writer, buffer)
        log.debug("session %s: recording to %s", info.session_id, path)
        return SessionRecorder(info, path, buffer)

    async def wait_finished(self, count: int) -> list[Path]:
        """Wait until ``count`` recordings are finished (see :attr:`finished`)."""
        while len(self.finished) < count:
            await self._wait_change()
        return self.finished[:count]

    async def _write_session(self, writer: SessionWriter, buffer: EventBuffer) -> None:
        """Hand the session's batches to a worker thread until its END is written."""
        entries: list[Entry] = []  # the first write creates the file with its META record
        abandoned = False
        try:
            while True:
                try:
                    gaps = await trio.to_thread.run_sync(
                        writer.write, entries, limiter=self._limiter, abandon_on_cancel=True
                    )
                except trio.Cancelled:
                    # Shutdown past drain_timeout: a stalled disk must not hold up the
                    # process, so the write is left to finish alone, with its file.
                    abandoned = True
                    raise
                buffer.written()
                for frames, size in gaps:
                    self._report_gap(frames, size)
                if writer.finished:
                    break
                await buffer.wait()
                if not buffer.closed and buffer.queued < BATCH_BYTES:
                    await trio.sleep(FLUSH_DELAY)
                entries = buffer.take(BATCH_MAX)
        except Exception:  # a bug must not end the recorder, and every other recording
            log.exception("session %s: recording failed", writer.session_id)
        finally:
            buffer.closed = True  # puts after this are ignored: nobody would write them
            if not abandoned:
                writer.abandon()
                with trio.CancelScope(shield=True):  # what was written is synced and closed
                    await trio.to_thread.run_sync(writer.finish)
            writer.report(buffer.dropped)
            self._writing -= 1
            if writer.file is not None:
                self.finished.append(writer.path)
            self._changed.set()

    def _report_gap(self, frames: int, size: int) -> None:
        if self.on_gap is None or not (frames or size):
            return
        try:
            self.on_gap(frames, size)
        except Exception:  # the caller's bug: the recording goes on
            log.exception("the recorder's on_gap callback failed")

    async def _wait_change(self) -> None:
        changed = self._changed
        await changed.wait()
        if self._changed is changed:
            self._changed = trio.Event()


@asynccontextmanager
async def running_recorder(recorder: Recorder | None) -> AsyncIterator[Recorder | None]:
    """Run ``recorder`` (if any) for the body; on exit, wait for its files to be written.

    Raises :class:`RecordingFolderError` on entry when the folder is unusable.
    """
    if recorder is None:
        yield None
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        try:
            yield recorder
        finally:
            recorder.close()


@asynccontextmanager
async def open_recorder(folder: str | Path, **kwargs: Any) -> AsyncIterator[Recorder]:
    """``async with open_recorder("recordings") as recorder:`` a running :class:`Recorder`."""
    recorder = Recorder(folder, **kwargs)
    async with running_recorder(recorder):
        yield recorder


def recorder_for(config: Config, on_gap: GapCallback | None = None) -> Recorder | None:
    """The recorder ``config.record`` asks for (not yet running), or None."""
    if config.record is None:
        return None
    return Recorder(config.record, options=options_from_config(config), on_gap=on_gap)
