"""Recording under trouble: a stalled disk, a full disk, a killed bridge, a bad folder.

In every case the session must keep relaying, and the file must say what it lacks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.trio.client import connect

from trio_bridge import Bridge, Config, TcpAddress
from trio_bridge.observe import Direction, SessionInfo
from trio_bridge.recording import (
    FrameRecord,
    GapRecord,
    LoadedRecording,
    Outcome,
    Recorder,
    RecordingError,
    load_recording,
    open_recording,
)
from trio_bridge.recording import writer as writer_module
from trio_bridge.recording.buffer import Entry
from trio_bridge.recording.format import HEADER_SIZE, EndRecord, Kind, Meta
from trio_bridge.recording.writer import SessionWriter

from .recording_support import (
    bridge_command,
    receive_bytes,
    scripted_target,
    start_logged,
    start_tcp_target,
    subprocess_env,
)

MESSAGE = bytes(range(256)) * 256  # 64 KiB


async def start_recording_bridge(
    nursery: trio.Nursery, folder: Path, target: TcpAddress, **recorder_options: Any
) -> tuple[str, Recorder]:
    recorder: Recorder = await nursery.start(Recorder(folder, **recorder_options).run)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = Config(target=target)
    await nursery.start(Bridge(config, observers=recorder).serve, [listener])
    return f"ws://127.0.0.1:{listener.getsockname()[1]}/", recorder


async def relay_messages(url: str, count: int) -> None:
    """Send ``count`` 64 KiB messages through an echo and check every byte came back."""
    async with connect(url, max_size=None, ping_interval=None) as ws:
        for _ in range(count):
            await ws.send(MESSAGE)
            assert await receive_bytes(ws, len(MESSAGE)) == MESSAGE


def check_accounting(
    recording: LoadedRecording, relayed_each_way: int, gaps: list[tuple[int, int]] | None = None
) -> None:
    """Recorded plus lost is everything relayed, each way: the data and the 2-byte
    payload of the close frame (gap counts cover frames of every kind). ``gaps``: what
    the recorder's ``on_gap`` was called with, which must add up to the GAP records."""
    if gaps is not None:
        assert gaps and all(frames > 0 for frames, _ in gaps), gaps
        assert sum(f for f, _ in gaps) == sum(g.total_frames for g in recording.gaps)
        assert sum(b for _, b in gaps) == sum(g.total_bytes for g in recording.gaps)
    for direction in Direction:
        recorded = sum(len(f.payload) for f in recording.frames(direction))
        lost = sum(
            g.bytes_up if direction is Direction.UP else g.bytes_down for g in recording.gaps
        )
        assert recorded + lost == relayed_each_way + 2, (direction, recorded, lost)


async def test_a_stalled_disk_never_stalls_the_session(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer blocks on its first write until the whole session has been relayed."""
    disk = threading.Event()
    original = writer_module.RecordingFile.append

    def stalled_append(self: writer_module.RecordingFile, entries: list) -> object:  # type: ignore[type-arg]
        disk.wait(30)
        return original(self, entries)

    monkeypatch.setattr(writer_module.RecordingFile, "append", stalled_append)
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    gaps: list[tuple[int, int]] = []
    url, recorder = await start_recording_bridge(
        nursery, tmp_path, target, buffer_limit=1 << 20, on_gap=lambda *gap: gaps.append(gap)
    )
    try:
        with trio.fail_after(20):
            await relay_messages(url, 64)  # 4 MiB each way through a 1 MiB buffer
    finally:
        disk.set()
    with trio.fail_after(10):
        (path,) = await recorder.wait_finished(1)
    recording = load_recording(path)
    assert recording.status.outcome is Outcome.COMPLETE
    assert recording.gaps and "buffer full" in recording.gaps[0].reason
    check_accounting(recording, 64 * len(MESSAGE), gaps)
    assert any("recording buffer full" in r.getMessage() for r in caplog.records)


async def test_a_disk_full_from_the_first_write_still_gives_a_readable_file(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write (META) fails: the retry at the end writes META, GAP and END."""
    calls = 0
    real = os.pwritev

    def full_once(*args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, "pwritev", full_once)
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    url, recorder = await start_recording_bridge(nursery, tmp_path, target)
    with trio.fail_after(10):
        await relay_messages(url, 4)
        (path,) = await recorder.wait_finished(1)
    recording = load_recording(path)
    assert recording.status.complete and recording.meta.target == str(target)
    (gap,) = recording.gaps
    assert gap.reason == "write failed: No space left on device"
    check_accounting(recording, 4 * len(MESSAGE))


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (needs root); skips the test where mounting is not allowed."""
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); see the RLIMIT test")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Take every byte left on the file system holding ``path``."""
    with open(path, "wb", buffering=0) as filler:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(bytes(size))


async def test_a_disk_that_stays_full_still_ends_the_file_with_gap_and_end(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real full disk (a 1 MiB tmpfs) that never frees up: 2 MiB each way fill it,
    then another file takes the last byte. The session runs on, and the file ends with
    GAP and END (cut back if need be, see the next test); on_gap counted every loss."""
    with tiny_filesystem(tmp_path / "small", "1m") as folder:
        target = await start_tcp_target(nursery, scripted_target(greeting=b""))
        gaps: list[tuple[int, int]] = []
        url, recorder = await start_recording_bridge(
            nursery, folder, target, on_gap=lambda *gap: gaps.append(gap)
        )
        with trio.fail_after(20):
            async with connect(url, max_size=None, ping_interval=None) as ws:
                for _ in range(32):
                    await ws.send(MESSAGE)
                    assert await receive_bytes(ws, len(MESSAGE)) == MESSAGE
                await trio.to_thread.run_sync(fill, folder / "filler")
            (path,) = await recorder.wait_finished(1)
        recording = load_recording(path)
    assert recording.status.complete, recording.status.describe()
    assert recording.gaps and "No space left on device" in recording.gaps[-1].reason
    check_accounting(recording, 32 * len(MESSAGE), gaps)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot write recording" in e and "No space left" in e for e in errors)


def test_a_full_disk_cuts_records_back_to_make_room_for_gap_and_end(tmp_path: Path) -> None:
    """The file ends on a page boundary of a tmpfs with not a byte left: the last batch
    fails whole, and the last records are cut away until GAP and END fit; the GAP
    counts them, and what the writer reports for on_gap adds up to it."""
    with tiny_filesystem(tmp_path / "small", "1m") as folder:
        path = folder / "x.tbrec"
        meta = Meta("c07bac00", "c:1", "t:2", "/", None, 0.0)
        writer = SessionWriter("c07bac00", path, (Kind.META, 0, 0, meta.encode()))
        assert writer.write([(Kind.BINARY, 0x03, i, bytes(3000)) for i in range(5)]) == []
        assert writer.file is not None
        pad = -(writer.file.size + HEADER_SIZE) % 4096
        assert writer.write([(Kind.BINARY, 0x01, 9, bytes(pad))]) == []
        assert writer.file.size % 4096 == 0
        fill(folder / "filler")
        end = EndRecord(20, 1000, "target closed the connection", "bridge")
        last: list[Entry] = [(Kind.BINARY, 0x03, 10, bytes(100)), (Kind.END, 0, 20, end.encode())]
        gaps = writer.write(last)
        writer.finish()
        recording = load_recording(path)
    assert recording.status.complete, recording.status.describe()
    gap = recording.records[-2]
    assert isinstance(gap, GapRecord) and "records cut to make room" in gap.reason
    assert "No space left on device" in gap.reason
    kept = [f.payload for f in recording.frames()]
    cut = 6 - len(kept)
    assert cut >= 1 and kept == [bytes(3000)] * len(kept)  # the newest went first
    assert gap.total_frames == cut + 1 and gaps == [(gap.total_frames, gap.total_bytes)]
    assert gap.bytes_up + gap.bytes_down == 100 + pad + 3000 * (cut - 1)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


async def test_a_file_size_limit_in_a_bridge_process_is_survived_and_marked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The same as a full disk without root: RLIMIT_FSIZE makes writes fail with EFBIG."""
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    log = await start_logged(
        nursery, bridge_command(tmp_path, target), preexec_fn=_limit_file_size
    )
    process = log.process
    try:
        with trio.fail_after(20):
            port = await log.port()
            await relay_messages(f"ws://127.0.0.1:{port}/", 32)
            # The writer's last word on a recording, logged once its file is closed.
            await log.wait_for(re.compile(rb"recording (\S+) is missing \d+ frames"))
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        print(await log.until_closed())  # shown when the test fails
    assert b"cannot write recording" in log.text and b"File too large" in log.text
    recording = load_recording(_only_recording(tmp_path))
    assert recording.status.complete, recording.status.describe()
    assert recording.gaps and "File too large" in recording.gaps[0].reason
    check_accounting(recording, 32 * len(MESSAGE))


# The first write of the bridge's recorder waits until the test opens this FIFO: a disk
# that stalls until the session has overflowed the recording buffer.
STALLED_DISK_BRIDGE = """
import sys
from trio_bridge.cli import main
from trio_bridge.recording import writer
real_append, stalled = writer.RecordingFile.append, [True]
def append(self, entries):
    if stalled:
        stalled.clear()
        with open(FIFO, "rb") as disk:
            disk.read()
    return real_append(self, entries)
writer.RecordingFile.append = append
sys.exit(main())
"""


@pytest.mark.parametrize("disk", ["normal", "stalled"])
async def test_a_recording_survives_kill_9_mid_session(
    nursery: trio.Nursery, tmp_path: Path, disk: str
) -> None:
    """What was readable before ``kill -9`` is readable after, and every byte kept is
    the byte the session relayed at that place, the dropped ones counted by GAP records.

    ``stalled``: the disk stalls until the session's buffer overflowed (the one case
    frames are dropped), and the kill waits until the GAP record and frames of both
    directions after it are on disk.
    """
    folder = tmp_path / "recordings"
    folder.mkdir()
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    command = bridge_command(folder, target)
    fifo = tmp_path / "disk"
    if disk == "stalled":
        os.mkfifo(fifo)
        command[2] = f"FIFO = {str(fifo)!r}\n{STALLED_DISK_BRIDGE}"
    log = await start_logged(nursery, command)
    process = log.process
    sent = bytearray()
    stalled = disk == "stalled"
    try:
        with trio.fail_after(20):
            port = await log.port()
            async with connect(f"ws://127.0.0.1:{port}/", max_size=None, ping_interval=None) as ws:
                message = 0
                while True:  # keep the session busy until the file has caught up a little
                    payload = message.to_bytes(4, "big") * 4096
                    await ws.send(payload)
                    sent += payload
                    assert await receive_bytes(ws, len(payload)) == payload
                    message += 1
                    if stalled and b"recording buffer full" in log.text:
                        await trio.to_thread.run_sync(fifo.write_bytes, b"")  # the disk is back
                        stalled = False
                    if message % 8 == 0 and not stalled:
                        frames, gaps, resumed = _readable(folder)
                        if frames >= 16 and (disk == "normal" or resumed):
                            break
                await ws.send(b"in flight when killed")
                process.send_signal(signal.SIGKILL)
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        print(await log.until_closed())  # shown when the test fails
    recording = load_recording(_only_recording(folder))
    assert recording.status.outcome in (Outcome.UNFINISHED, Outcome.TRUNCATED)
    assert len(recording.frames()) >= frames and len(recording.gaps) >= gaps
    everything = bytes(sent) + b"in flight when killed"  # the last may have made it
    for direction in Direction:
        _check_in_place(recording, direction, everything)


def _check_in_place(recording: LoadedRecording, direction: Direction, relayed: bytes) -> None:
    """Each kept data frame of ``direction`` holds the bytes at its place in ``relayed``,
    the place advanced by the frames before it and by the bytes GAP records say were lost."""
    at = 0
    for record in recording.records:
        if isinstance(record, GapRecord):
            at += record.bytes_up if direction is Direction.UP else record.bytes_down
        elif isinstance(record, FrameRecord) and record.direction is direction and record.is_data:
            assert relayed[at : at + len(record.payload)] == record.payload, (direction, at)
            at += len(record.payload)
    assert at <= len(relayed)


def _only_recording(folder: Path) -> Path:
    (path,) = folder.glob("*.tbrec")
    return path


def _readable(folder: Path) -> tuple[int, int, bool]:
    """Frames and GAP records readable so far from a recording another process is still
    writing, and whether data frames of both directions follow the first GAP."""
    for path in folder.glob("*.tbrec"):
        try:
            with open_recording(path) as reader:
                records = list(reader)
        except RecordingError:
            break
        gaps = [i for i, r in enumerate(records) if isinstance(r, GapRecord)]
        after = records[gaps[0] :] if gaps else []
        directions = {r.direction for r in after if isinstance(r, FrameRecord) and r.is_data}
        frames = sum(isinstance(r, FrameRecord) for r in records)
        return frames, len(gaps), len(directions) == 2
    return 0, 0, False


# -- the recording folder -----------------------------------------------------------------------


def run_bridge_cli(record: Path) -> subprocess.CompletedProcess[str]:
    command = bridge_command(record, TcpAddress("127.0.0.1", 9))
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=subprocess_env())


def test_a_missing_recording_folder_stops_the_bridge_with_one_line(tmp_path: Path) -> None:
    result = run_bridge_cli(tmp_path / "missing")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"trio-bridge: cannot record sessions: folder {tmp_path / 'missing'} does not exist "
        "(create it first)"
    )
    assert "Traceback" not in result.stderr


def test_an_unwritable_recording_folder_stops_the_bridge_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make the file system read-only
        with tiny_filesystem(tmp_path / "ro", "64k") as mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
            result = run_bridge_cli(mounted)
        folder = mounted
    else:
        folder.chmod(0o500)
        result = run_bridge_cli(folder)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trio-bridge: cannot record sessions: folder {folder} is not writable")
    assert "Traceback" not in result.stderr


def test_a_folder_on_proc_gives_the_true_cause() -> None:
    """/proc exists and is a folder, but no file can be created there (ENOENT): this
    used to say "folder /proc is not writable (No such file or directory)"."""
    result = run_bridge_cli(Path("/proc"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "trio-bridge: cannot record sessions: cannot create files in /proc: it is on a proc "
        "file system, which does not allow it (No such file or directory); choose a folder "
        "on a disk"
    )
    assert "Traceback" not in result.stderr


async def test_sessions_opened_while_the_recorder_drains_are_not_recorded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Once close() is called no new recording starts (its writer would never be
    served), and run() returns as soon as the open ones are written."""
    recorder: Recorder = await nursery.start(Recorder(tmp_path, drain_timeout=30).run)
    first = recorder.open(SessionInfo("0000000a", "c:1", "t:2", "/", None, 0.0))
    assert first is not None
    recorder.close()
    assert recorder.open(SessionInfo("0000000b", "c:1", "t:2", "/", None, 0.0)) is None
    first.on_end(1000, "", "client")
    with trio.fail_after(10):
        (path,) = await recorder.wait_finished(1)
    assert load_recording(path).status.complete and "0000000a" in path.name
    assert [p.name for p in await trio.Path(tmp_path).iterdir()] == [path.name]
