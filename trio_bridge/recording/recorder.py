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
that queues batches for the recorder's one long-lived writing thread
(:class:`~trio_bridge.recording.writer.SessionWriter` does the I/O), so the relay never
waits for the disk. One thread for all sessions: a bridge's recordings share one disk.
Not ``trio.to_thread`` per batch: its two trips through a busy event loop took ~20 ms a
batch on the 2-core VM while a session relayed 200 MiB/s, and the recording kept half
of it (see docs/recording-format.md, Performance). Everything is recorded unless the
disk falls behind a session by a whole buffer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from .. import __version__
from ..config import Config, ServiceConfig, StartupError
from ..observe import Direction, ObservedFrame, SessionInfo
from .buffer import Entry, EventBuffer
from .format import FILE_SUFFIX, EndRecord, Kind, Meta, frame_flags
from .writer import SessionWriter

log = logging.getLogger("trio_bridge.recording")

#: Per session: 80 ms of a 200 MiB/s session (8 MiB lost 6-12% of one to the stalls of
#: a loaded 2-core VM).
DEFAULT_BUFFER_LIMIT = 16 << 20
DEFAULT_DRAIN_TIMEOUT = 10.0
#: The writing task queues a batch at once when this much is waiting; with less it waits
#: :data:`FLUSH_DELAY` first, so that a session of small messages costs one hand-off to
#: the writing thread per batch rather than per frame.
BATCH_BYTES = 256 << 10
FLUSH_DELAY = 0.005
#: The most a batch takes from a session's buffer (it counts against the buffer until
#: written): small batches free room sooner for what arrives meanwhile.
BATCH_MAX = 2 << 20

#: ``on_gap(frames, bytes)``: called on the Trio thread for each gap marked in a recording.
GapCallback = Callable[[int, int], None]
_Job = tuple[SessionWriter, list[Entry], int, EventBuffer, trio.Event]


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

    def on_frame(self, direction: Direction, frame: ObservedFrame) -> None:
        flags = frame_flags(direction, frame.fin)
        if (
            not self.buffer.put(int(frame.opcode), flags, self._now_us(), frame.payload)
            and not self._warned
        ):
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
        #: Batches for the writing thread: (writer, entries, cost, buffer, done), or
        #: None to stop it.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._writing = 0  # sessions whose recording is not finished
        self._closing = trio.Event()
        self._changed = trio.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[Recorder] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check the folder (raising :class:`RecordingFolderError`), then host the writing."""
        self.folder = await trio.to_thread.run_sync(check_folder, self.folder)
        log.info("recording sessions to %s", self.folder)
        self._token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._serve, name="trio-bridge recorder", daemon=True)
        thread.start()
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
            self._jobs.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, self.drain_timeout)

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
        """Queue the session's batches for the writing thread until its END is written.

        The task does not wait for each batch: a round trip through the event loop per
        batch took ~20 ms while a session relayed 200 MiB/s on the 2-core VM, which
        capped the recording at half the session. Batches of one session are written
        in order (one thread, one queue); each counts against the buffer until written.
        """
        entries: list[Entry] = []  # the first batch creates the file with its META record
        cost = 0
        done = trio.Event()
        patience = float("inf")  # for the thread to finish the last batch
        try:
            async with trio.open_nursery() as dropping:  # the file is closed after it
                while True:
                    done = trio.Event()
                    self._jobs.put((writer, entries, cost, buffer, done))
                    if buffer.closed and not buffer.queued:  # END is on its way
                        break
                    await buffer.wait()
                    if not buffer.closed and buffer.queued < BATCH_BYTES:
                        await trio.sleep(FLUSH_DELAY)
                    if writer.finished:  # the file could not be created
                        break
                    entries, cost = buffer.take(BATCH_MAX)
                    file = writer.file
                    if file is not None and file.drop_due and not dropping.child_tasks:
                        dropping.start_soon(trio.to_thread.run_sync, file.drop_behind)
        except BaseException:  # cancelled (shutdown) or a bug: a stalled disk must not hang us
            patience = self.drain_timeout
            raise
        finally:
            buffer.closed = True  # puts after this are ignored: nobody would write them
            with trio.CancelScope(shield=True):
                # The thread must be done with the file before it is closed; after a
                # stalled disk outlasted drain_timeout, it is left to the thread.
                with trio.move_on_after(patience):
                    await done.wait()
                writer.abandon()
                if done.is_set():  # what was written is synced and closed
                    await trio.to_thread.run_sync(writer.finish)
            writer.report(buffer.dropped)
            self._writing -= 1
            if writer.file is not None:
                self.finished.append(writer.path)
            self._changed.set()

    def _serve(self) -> None:
        """The writing thread: one batch after the other, results to the event loop."""
        while (job := self._jobs.get()) is not None:
            writer, entries, cost, buffer, done = job
            try:
                gaps = writer.write(entries)
            except Exception:  # a bug must not end every other recording
                log.exception("session %s: recording failed", writer.session_id)
                writer.abandon()
                gaps = []
            assert self._token is not None
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._written, buffer, cost, gaps, done)

    def _written(
        self, buffer: EventBuffer, cost: int, gaps: list[tuple[int, int]], done: trio.Event
    ) -> None:
        buffer.written(cost)
        for frames, size in gaps:
            self._report_gap(frames, size)
        done.set()

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


def recorder_for(service: ServiceConfig, on_gap: GapCallback | None = None) -> Recorder | None:
    """The recorder ``service.record`` asks for (not yet running), or None."""
    if service.record is None:
        return None
    options = options_from_config(service.bridge)
    return Recorder(service.record, options=options, on_gap=on_gap)
