"""The session recorder: an :class:`~trio_bridge.observe.ObserverFactory` writing one file
per session.

::

    recorder = Recorder("recordings")
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)          # checks the folder, hosts the writers
        bridge = await nursery.start(Bridge(config, observers=recorder).serve)
        ...
    # or: async with open_recorder("recordings") as recorder: ...

Each session gets a :class:`SessionRecorder` (the observer, called synchronously by the
relay) and a :class:`~trio_bridge.recording.writer.SessionWriter` served by the
recorder's one :class:`~trio_bridge.recording.writer.RecordingThread`; the two share a
bounded :class:`~trio_bridge.recording.buffer.EventBuffer`, so the relay never waits
for the disk. Finished files are synced and closed by tasks in the recorder's nursery.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from websockets.frames import Frame

from .. import __version__
from ..config import Config, StartupError
from ..observe import Direction, SessionInfo
from .buffer import EventBuffer
from .format import FILE_SUFFIX, FLAG_DOWN, FLAG_FIN, EndRecord, Kind, Meta, frame_flags
from .pipes import tee_chunk
from .writer import RecordingThread, SessionWriter

log = logging.getLogger("trio_bridge.recording")

DEFAULT_BUFFER_LIMIT = 8 << 20  # per session
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_FOLDER = "recordings"


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


def default_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """``$STATE_DIRECTORY`` under systemd (``StateDirectory=``), else ``./recordings``."""
    state = environ.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])
    return Path(DEFAULT_FOLDER)


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
        "record_priority": config.record_priority,
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
        if not self.buffer.put(int(frame.opcode), flags, self._now_us(), data):
            self._warn_full()

    def on_spliced_data(self, pipe: int, length: int) -> None:
        """Target data about to be spliced to the client: tee(2) it into a pipe of its own."""
        if self.buffer.closed:  # the recording was given up: no pipe to spend on it
            return
        flags = FLAG_DOWN | FLAG_FIN
        if not self.buffer.room_for_pipe(length):
            self.buffer.lose(flags, self._now_us(), length)
            self._warn_full()
            return
        chunk = tee_chunk(pipe, length)
        if isinstance(chunk, str):
            self.buffer.lose(flags, self._now_us(), length, chunk)
            self._warn_once(f"cannot record spliced target data: {chunk}")
        elif not self.buffer.put(Kind.BINARY, flags, self._now_us(), chunk):
            self._warn_full()

    def _warn_full(self) -> None:
        self._warn_once(
            f"recording buffer full ({self.buffer.limit} bytes): dropping events until "
            "the disk catches up"
        )

    def _warn_once(self, what: str) -> None:
        """The first loss of a session is worth a line; the counts come at its end."""
        if not self._warned:
            self._warned = True
            log.warning(
                "session %s: %s; the gap is marked in %s", self.info.session_id, what, self.path
            )

    def on_end(self, close_code: int | None, close_reason: str, closed_by: str) -> None:
        end = EndRecord(self._now_us(), close_code, close_reason, closed_by)
        self.buffer.close((Kind.END, 0, end.time_us, end.encode()))


class Recorder:
    """Records every session of a bridge to its own file in ``folder``.

    ``run()`` must be running (in a nursery) while sessions open; it returns after
    :meth:`close` once every recording is written, or ``drain_timeout`` later.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        options: Mapping[str, Any] | None = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        relay_first: bool = True,
    ) -> None:
        self.folder = Path(folder)
        #: While the relay is CPU-bound the writer backs off (see relay_first.py); False
        #: writes every frame the buffer holds instead, at the relay's expense.
        self.relay_first = relay_first
        self.options = dict(options or {})
        self.buffer_limit = buffer_limit
        self.drain_timeout = drain_timeout
        #: Recordings whose writer is done with them (complete, or given up on), in the
        #: order they finished.
        self.finished: list[Path] = []
        self._nursery: trio.Nursery | None = None
        self._thread: RecordingThread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._writers: set[SessionWriter] = set()  # until their file is closed
        self._closing = trio.Event()
        self._changed = trio.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[Recorder] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check the folder (raising :class:`RecordingFolderError`), then run the writing."""
        self.folder = await trio.to_thread.run_sync(check_folder, self.folder)
        log.info("recording sessions to %s", self.folder)
        self._token = trio.lowlevel.current_trio_token()
        loop_thread = threading.get_native_id() if self.relay_first else None
        thread = RecordingThread(self._thread_finished, loop_thread)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._thread = thread
                thread.start()
                task_status.started(self)
                await self._closing.wait()
                with trio.move_on_after(self.drain_timeout):
                    while self._writers:
                        await self._wait_change()
                if self._writers:
                    log.warning(
                        "%d recording(s) still being written after %g s; stopping them",
                        len(self._writers),
                        self.drain_timeout,
                    )
                thread.stop(abandon=True)
                with trio.move_on_after(self.drain_timeout):
                    while self._writers:  # the abandoned files get closed
                        await self._wait_change()
        finally:
            self._nursery = None
            thread.stop(abandon=True)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, self.drain_timeout)

    def close(self) -> None:
        """Finish: ``run()`` returns when the open recordings are written."""
        self._closing.set()

    def open(self, info: SessionInfo) -> SessionRecorder | None:
        thread = self._thread
        if self._nursery is None or thread is None:
            log.warning("session %s: not recorded: the recorder is not running", info.session_id)
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
        meta_entry = (Kind.META, 0, 0, meta.encode())
        buffer = EventBuffer(
            self.buffer_limit, thread.condition, lambda urgent: thread.ready(writer, urgent)
        )
        writer = SessionWriter(info.session_id, path, meta_entry, buffer)
        if self._closing.is_set() or not thread.add(writer):
            log.warning("session %s: not recorded: the recorder is stopping", info.session_id)
            return None
        self._writers.add(writer)
        log.debug("session %s: recording to %s", info.session_id, path)
        return SessionRecorder(info, path, buffer)

    async def wait_finished(self, count: int) -> list[Path]:
        """Wait until ``count`` recordings are finished (see :attr:`finished`)."""
        while len(self.finished) < count:
            await self._wait_change()
        return self.finished[:count]

    def _thread_finished(self, writer: SessionWriter) -> None:
        """Called in the recording thread: hand the file to the event loop to close."""
        token = self._token
        try:
            assert token is not None
            token.run_sync_soon(self._close_soon, writer)
        except trio.RunFinishedError:
            writer.finish()  # no event loop left to do it

    def _close_soon(self, writer: SessionWriter) -> None:
        if self._nursery is None:  # run() is on its way out: close here, unsynced
            writer.finish(sync=False)
            self._closed(writer)
            return
        self._nursery.start_soon(self._close_file, writer)

    async def _close_file(self, writer: SessionWriter) -> None:
        # Shielded: a recording that was written is also synced and closed.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(writer.finish)
        self._closed(writer)

    def _closed(self, writer: SessionWriter) -> None:
        self._writers.discard(writer)
        if writer.file is not None:
            self.finished.append(writer.path)
        self._changed.set()

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


def recorder_for(config: Config) -> Recorder | None:
    """The recorder ``config.record`` asks for (not yet running), or None."""
    if config.record is None:
        return None
    return Recorder(
        config.record,
        options=options_from_config(config),
        relay_first=config.record_priority == "relay",
    )
