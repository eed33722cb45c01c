"""The session recorder and its file format: round trip, naming, damaged files, memory."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.trio.client import connect

from trio_bridge import TcpAddress
from trio_bridge.cli import build_parser, config_from_args
from trio_bridge.observe import Direction, ObservedFrame, Opcode, SessionInfo
from trio_bridge.pytest_plugin import StartBridge
from trio_bridge.recording import (
    EndRecord,
    FrameRecord,
    GapRecord,
    Kind,
    LoadedRecording,
    Outcome,
    RecordingError,
    RecordingReader,
    load_recording,
    open_recording,
)
from trio_bridge.recording.buffer import Entry, EventBuffer
from trio_bridge.recording.format import HEADER_SIZE, Meta, encode_header, encode_prelude
from trio_bridge.recording.recorder import SessionRecorder, recorder_for, recording_name
from trio_bridge.recording.writer import RecordingFile
from trio_bridge.replay import PayloadView, print_timeline
from trio_bridge.session import RECV_SIZE

from .recording_support import (
    BIG,
    CLOSE_CODE,
    CLOSE_REASON,
    FRAGMENTS,
    GREETING,
    SCRIPT,
    bridge_command,
    receive_bytes,
    record_scripted_session,
    scripted_target,
    start_logged,
    start_tcp_target,
)

DATA = Path(__file__).parent / "data"
NAME = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)_([0-9a-f]{8})_127\.0\.0\.1-\d+_127\.0\.0\.1-\d+\.tbrec$")


def data_bytes(recording: LoadedRecording, direction: Direction) -> bytes:
    return b"".join(f.payload for f in recording.frames(direction) if f.is_data)


async def test_round_trip_keeps_every_frame_in_order(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        wall_before = time.time()
        started = time.monotonic()
        path = await record_scripted_session(nursery, start_ws_bridge, tmp_path)
        elapsed_us = (time.monotonic() - started) * 1e6
    recording = load_recording(path)
    assert recording.status.outcome is Outcome.COMPLETE, recording.status.describe()

    meta = recording.meta
    assert meta.subprotocol == "binary" and meta.path == "/"
    assert meta.client.startswith("127.0.0.1:") and meta.target.startswith("127.0.0.1:")
    assert wall_before - 1 <= meta.started <= time.time()
    match = NAME.match(path.name)
    assert match and match.group(2) == meta.session_id

    up = [(f.kind, f.fin, f.payload) for f in recording.frames(Direction.UP)]
    assert up == [
        (Kind.BINARY, True, GREETING),
        (Kind.TEXT, True, b"hello text"),
        (Kind.BINARY, False, FRAGMENTS[0]),
        (Kind.CONT, False, FRAGMENTS[1]),
        (Kind.CONT, False, FRAGMENTS[2]),
        (Kind.CONT, True, b""),  # websockets ends a fragmented message with an empty frame
        (Kind.BINARY, True, BIG),
        (Kind.PING, True, b"are you there"),
        (Kind.CLOSE, True, CLOSE_CODE.to_bytes(2, "big") + CLOSE_REASON.encode()),
    ]
    answers = GREETING + b"".join(step.answer for step in SCRIPT)
    assert data_bytes(recording, Direction.DOWN) == answers
    down_control = [(f.kind, f.payload) for f in recording.frames(Direction.DOWN) if not f.is_data]
    assert down_control == [(Kind.PONG, b"are you there"), (Kind.CLOSE, up[-1][2])]

    # Causality: the client sent each message after the previous answer had arrived.
    seen_down = 0
    expected_seen = iter(
        [len(GREETING) + sum(len(s.answer) for s in SCRIPT[:i]) for i in range(len(SCRIPT))]
    )
    for frame in recording.frames():
        if frame.direction is Direction.DOWN and frame.is_data:
            seen_down += len(frame.payload)
        elif frame.kind in (Kind.BINARY, Kind.TEXT):
            assert seen_down == next(expected_seen)

    times = [r.time_us for r in recording.records]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= elapsed_us
    end = recording.end
    assert end is not None
    assert (end.close_code, end.close_reason, end.closed_by) == (CLOSE_CODE, CLOSE_REASON, "client")


async def test_names_sort_by_time_and_files_are_compact(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    running = await start_ws_bridge(target, record=tmp_path)
    message = bytes(range(256)) * 256  # 64 KiB
    with trio.fail_after(20):
        for _ in range(3):
            async with connect(running.url, max_size=None) as ws:
                for _ in range(8):
                    await ws.send(message)
                    assert await receive_bytes(ws, len(message)) == message
        paths = await running.recordings(3)
    by_start = sorted(paths, key=lambda path: load_recording(path).meta.started)
    assert sorted(p.name for p in paths) == [p.name for p in by_start]  # files may close
    for path in paths:
        recording = load_recording(path)
        payload = sum(len(f.payload) for f in recording.frames())
        assert payload >= 2 * 8 * len(message)
        assert path.stat().st_size <= payload * 1.05


async def test_bulk_target_data_is_recorded_byte_for_byte(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    """A bulk download, with the default buffer and nothing lifted: every byte is in the
    file and no gap. The recorded session relays framed (no frame larger than one read
    of RECV_SIZE: splice would have sent frames of up to 1 MiB)."""
    data = os.urandom(32 << 20)

    async def bulk_target(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
            await stream.receive_some()  # until the client closes

    target = await start_tcp_target(nursery, bulk_target)
    running = await start_ws_bridge(target, record=tmp_path)
    with trio.fail_after(60):
        async with connect(running.url, max_size=None) as ws:
            assert await receive_bytes(ws, len(data)) == data
        (path,) = await running.recordings(1)
    recording = load_recording(path)
    assert recording.status.complete and not recording.gaps
    down = [f for f in recording.frames(Direction.DOWN) if f.kind is Kind.BINARY]
    assert b"".join(f.payload for f in down) == data
    assert max(len(f.payload) for f in down) <= RECV_SIZE


def test_file_name_is_readable_for_every_address() -> None:
    info = SessionInfo("1cc78eb0", "[::1]:35798", "unix:/run/vnc.sock", "/", None, 0.5)
    expected = "19700101T000000.500000Z_1cc78eb0_1-35798_unix-run-vnc.sock.tbrec"
    assert recording_name(info) == expected


# -- damaged files ---------------------------------------------------------------------------


def small_recording() -> tuple[bytes, list[int]]:
    """A complete recording of a few frames, built with the writer's own encoder, and
    the offsets where its records end."""
    buffer = io.BytesIO()
    meta = Meta("0badc0de", "127.0.0.1:1", "127.0.0.1:2", "/", "binary", 1.0)
    frames: list[tuple[int, int, int, bytes]] = [
        (Kind.META, 0, 0, meta.encode()),
        (Kind.BINARY, 0x03, 10, b"RFB 003.008\n"),
        (Kind.BINARY, 0x01, 20, b"RFB 003.008\n"),
        (Kind.TEXT, 0x00, 30, b"part one, "),
        (Kind.CONT, 0x01, 40, b"part two"),
        (Kind.PING, 0x01, 50, b""),
        (Kind.PONG, 0x03, 51, b""),
        (Kind.CLOSE, 0x01, 60, b"\x03\xe8bye"),
        (Kind.CLOSE, 0x03, 61, b"\x03\xe8bye"),
        (Kind.END, 0, 70, b'{"close_code":1000,"close_reason":"bye","closed_by":"client"}'),
    ]
    buffer.write(encode_prelude())
    ends = []
    for kind, flags, time_us, payload in frames:
        buffer.write(encode_header(kind, flags, time_us, payload) + payload)
        ends.append(buffer.tell())
    return buffer.getvalue(), ends


def read_all(data: bytes) -> tuple[list[object], RecordingReader]:
    reader = RecordingReader(io.BytesIO(data), "cut")
    return list(reader), reader


def test_a_file_cut_at_any_byte_reads_up_to_its_last_complete_record() -> None:
    data, ends = small_recording()
    full, reader = read_all(data)
    assert reader.status is not None and reader.status.complete
    meta_end = ends[0]
    for cut in range(len(data) + 1):
        if cut < meta_end:
            with pytest.raises(RecordingError) as raised:
                read_all(data[:cut])
            assert "offset" in str(raised.value)
            continue
        records, reader = read_all(data[:cut])
        status = reader.status
        assert status is not None
        assert records == full[: len(records)]
        last_end = max(end for end in ends if end <= cut)
        assert status.offset == last_end
        if cut == len(data):
            assert status.outcome is Outcome.COMPLETE
        elif cut == last_end:
            assert status.outcome is Outcome.UNFINISHED
        else:
            assert status.outcome is Outcome.TRUNCATED
            assert "ends inside" in status.detail


def test_a_damaged_header_byte_stops_reading_at_its_record() -> None:
    data, ends = small_recording()
    full, _ = read_all(data)
    starts = ends[:-1]  # of every record after META
    headers = [p for s in starts for p in range(s, s + HEADER_SIZE)]
    assert len(headers) == 9 * 22
    for position in headers:
        damaged = bytearray(data)
        damaged[position] ^= 0x20
        records, reader = read_all(bytes(damaged))
        assert reader.status is not None
        assert reader.status.outcome is Outcome.CORRUPT
        damaged_record = max(s for s in starts if s <= position)
        assert reader.status.offset == damaged_record
        assert records == full[: starts.index(damaged_record)]


def test_a_damaged_payload_byte_stops_reading_at_its_record() -> None:
    """Version 3 checks every payload: a byte flipped in place (a bad sector, a torn
    write) is caught, where version 2 returned it as recorded."""
    data, ends = small_recording()
    full, _ = read_all(data)
    position = data.index(b"part two")
    damaged = bytearray(data)
    damaged[position] ^= 0x20
    records, reader = read_all(bytes(damaged))
    assert reader.status is not None and reader.status.outcome is Outcome.CORRUPT
    assert "payload fails its checksum" in reader.status.detail
    assert reader.status.offset == max(e for e in ends if e < position)
    assert records == full[: len(records)] and len(records) == 3


def test_version_1_files_still_read_and_their_payload_checksums_still_count() -> None:
    """A file written by trio-bridge 0.1.0 (format 1: a CRC-32 of every payload)."""
    data = (DATA / "recording-v1.tbrec").read_bytes()
    records, reader = read_all(data)
    assert reader.layout.version == 1 and reader.meta.session_id == "0ld5e551"
    assert reader.status is not None and reader.status.complete
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert [f.payload for f in frames[:2]] == [b"RFB 003.008\n"] * 2
    assert [f.direction for f in frames[:2]] == [Direction.DOWN, Direction.UP]
    (gap,) = [r for r in records if isinstance(r, GapRecord)]
    assert (gap.frames_up, gap.bytes_down) == (1, 200)
    position = data.index(b"part two")  # a payload byte: format 1 can tell
    damaged = bytearray(data)
    damaged[position] ^= 0x20
    records, reader = read_all(bytes(damaged))
    assert reader.status is not None and reader.status.outcome is Outcome.CORRUPT
    assert "payload fails its checksum" in reader.status.detail
    assert len(records) == 3


def test_version_2_files_still_read() -> None:
    """A file written by the format-2 writer (18-byte headers, no payload checksum),
    made with that writer's own code; a payload byte damaged in place goes unnoticed
    there, as docs/recording-format.md says."""
    data = (DATA / "recording-v2.tbrec").read_bytes()
    records, reader = read_all(data)
    assert reader.layout.version == 2 and reader.meta.session_id == "2ec0rd02"
    assert reader.status is not None and reader.status.complete
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert [(f.direction, f.kind, f.payload) for f in frames[:4]] == [
        (Direction.DOWN, Kind.BINARY, b"RFB 003.008\n"),
        (Direction.UP, Kind.BINARY, b"RFB 003.008\n"),
        (Direction.UP, Kind.TEXT, b"part one, "),
        (Direction.UP, Kind.CONT, b"part two"),
    ]
    (gap,) = [r for r in records if isinstance(r, GapRecord)]
    assert (gap.frames_up, gap.bytes_up, gap.frames_down, gap.bytes_down) == (1, 3000, 1, 5000)
    end = records[-1]
    assert isinstance(end, EndRecord) and end.close_code == 1000
    damaged = bytearray(data)
    damaged[data.index(b"part two")] ^= 0x20
    records, reader = read_all(bytes(damaged))
    assert reader.status is not None and reader.status.complete
    assert b"Part two" in [r.payload for r in records if isinstance(r, FrameRecord)]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the file is empty"),
        (b"\x89TBR\r", "ends inside the 12-byte prelude"),
        (b"GIF89a" + bytes(20), "not a trio-bridge recording"),
        (b"\x89TBR\r\n\x1a\n\x00\x04\x00\x00", "version 4 is not supported"),
        (b"\x89TBR\r\n\x1a\n\x00\x01\x00\x00" + bytes(40), "checksum"),
        (b"\x89TBR\r\n\x1a\n\x00\x02\x00\x00" + bytes(40), "checksum"),
        (b"\x89TBR\r\n\x1a\n\x00\x03\x00\x00" + bytes(40), "checksum"),
    ],
)
def test_files_that_are_not_recordings_give_one_line_with_the_offset(
    data: bytes, message: str
) -> None:
    with pytest.raises(RecordingError) as raised:
        RecordingReader(io.BytesIO(data), "x.tbrec")
    text = str(raised.value)
    assert text.startswith("x.tbrec: offset ") and message in text and "\n" not in text


# -- memory ---------------------------------------------------------------------------------


def test_reading_and_printing_a_large_recording_keeps_memory_flat(tmp_path: Path) -> None:
    path = tmp_path / "large.tbrec"
    file = RecordingFile(path)
    meta = Meta("feedface", "c", "t", "/", None, 0.0)
    chunk = bytes(range(256)) * 256
    file.append([(Kind.META, 0, 0, meta.encode())])
    for i in range(64):  # 64 MiB in 1024 records of 64 KiB
        file.append([(Kind.BINARY, 0x03, i * 16 + j, chunk) for j in range(16)])
    file.close(sync=False)
    assert path.stat().st_size > 64 << 20

    tracemalloc.start()
    try:
        with open_recording(path) as reader:
            total = sum(len(r.payload) for r in reader if isinstance(r, FrameRecord))
        _, read_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with open_recording(path) as reader:
            print_timeline(reader, io.StringIO(), view=PayloadView.PREVIEW)
        _, print_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert read_peak < 4 << 20, read_peak
    assert print_peak < 4 << 20, print_peak


def _entries(count: int) -> list[Entry]:
    return [(Kind.BINARY, 0x03, i, os.urandom(1000 + i % 7 * 4099)) for i in range(count)]


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_failed_write_cuts_back_to_a_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """Whichever write of a batch fails (after a short write, IOV_MAX buffers at a time):
    the file ends at its last complete record, ``done`` says how many entries made it,
    and appending goes on from there."""
    path = tmp_path / "x.tbrec"
    file = RecordingFile(path)
    meta = Meta("0ddba11", "c", "t", "/", None, 0.0)
    assert file.append([(Kind.META, 0, 0, meta.encode())]) == (1, None)
    entries = _entries(600)  # 1200 buffers: two pwritev calls at least
    real = os.pwritev
    calls = 0

    def failing(fd: int, buffers: list[Any], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers[: len(buffers) // 2 + 1], offset)  # short writes

    monkeypatch.setattr(os, "pwritev", failing)
    done, error = file.append(entries)
    monkeypatch.undo()
    recording = load_recording(path)
    assert path.stat().st_size == file.size == recording.status.offset
    assert len(recording.frames()) == done
    assert error is not None and error.errno == errno.ENOSPC and done < len(entries)
    assert [f.payload for f in recording.frames()] == [e[3] for e in entries[:done]]
    assert file.append([(Kind.PING, 0, 99, b"after")]) == (1, None)  # and goes on
    file.close(sync=False)


def test_records_are_cut_back_to_make_room_for_gap_and_end(tmp_path: Path) -> None:
    """``cut_last`` takes whole records back, newest first, and never the META record."""
    path = tmp_path / "x.tbrec"
    file = RecordingFile(path)
    meta = Meta("c07bac", "c", "t", "/", None, 0.0)
    entries = _entries(3)
    assert file.append([(Kind.META, 0, 0, meta.encode()), *entries]) == (4, None)
    for entry in reversed(entries):
        kind, flags, time_us, length, _ = file.cut_last() or (0, 0, 0, 0, b"")
        assert (kind, flags, time_us, length) == (*entry[:3], len(entry[3]))
        assert path.stat().st_size == file.size
    assert file.cut_last() is None
    assert load_recording(path).records == []  # META alone
    file.close(sync=False)


# -- the recorder's buffer --------------------------------------------------------------------


def test_a_full_buffer_drops_frames_and_marks_the_gap(tmp_path: Path) -> None:
    info = SessionInfo("00000001", "c:1", "t:2", "/", None, 0.0)
    buffer = EventBuffer(limit=4000)
    observer = SessionRecorder(info, tmp_path / "x.tbrec", buffer)
    for _ in range(10):  # each costs 500 + 160 bytes
        observer.on_frame(Direction.UP, ObservedFrame(Opcode.BINARY, bytes(500)))
    taken, cost = buffer.take(1 << 30)
    assert len(taken) == 6 and cost == 6 * 660  # the rest did not fit
    observer.on_frame(Direction.UP, ObservedFrame(Opcode.BINARY, bytes(500)))  # still in flight
    buffer.written(cost)
    observer.on_frame(Direction.DOWN, ObservedFrame(Opcode.BINARY, b"after"))
    observer.on_end(1000, "", "client")
    (gap, after, end), _ = buffer.take(1 << 30)
    assert gap[0] == Kind.GAP and b'"frames_up":5,"bytes_up":2500' in gap[3]
    assert after[3] == b"after" and end[0] == Kind.END
    assert buffer.dropped.total_frames == 5
    observer.on_frame(Direction.UP, ObservedFrame(Opcode.BINARY, b"late"))  # after END: ignored
    assert buffer.take(1 << 30) == ([], 0)


# -- the --record option ----------------------------------------------------------------------


def test_record_option_takes_a_folder(tmp_path: Path) -> None:
    """``--record DIR``: DIR is always the folder, never taken for the listen address."""
    for argv in (
        ["--record", str(tmp_path), "6080", "localhost:5900"],
        ["6080", "localhost:5900", "--record", str(tmp_path)],
    ):
        config = config_from_args(build_parser().parse_args(argv))
        assert config.record == tmp_path and config.bridge.listen == TcpAddress("127.0.0.1", 6080)
    config = config_from_args(build_parser().parse_args(["--record", "6080", "6081", "h:1"]))
    assert config.record == Path("6080")  # a folder named 6080
    recorder = recorder_for(config)
    assert recorder is not None and recorder.folder == Path("6080")
    assert config_from_args(build_parser().parse_args(["6080", "h:1"])).record is None


def test_record_without_a_folder_is_a_one_line_usage_error() -> None:
    python_c = bridge_command(Path("unused"), TcpAddress("127.0.0.1", 9))[:3]
    for argv in (["6080", "h:1", "--record"], ["--record", "-v", "6080", "h:1"]):
        result = subprocess.run([*python_c, *argv], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "error: argument --record: expected one argument" in line, line


async def test_record_priority_is_a_deprecated_no_op_with_one_warning(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Existing command lines keep working this release: one warning at start-up."""
    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    command = [*bridge_command(tmp_path, target), "--record-priority", "relay"]
    log = await start_logged(nursery, command)
    process = log.process
    try:
        with trio.fail_after(20):
            await log.port()
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        text = await log.until_closed()
    assert process.returncode == 0, text
    assert text.count("--record-priority is deprecated and has no effect") == 1, text
    assert "Traceback" not in text


async def test_an_empty_close_frame_is_recorded_as_sent(
    nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path
) -> None:
    """A close frame without a code (1005) is echoed empty, and recorded empty both ways."""
    from websockets.frames import Opcode

    from .conftest import RawClient, client_frame

    target = await start_tcp_target(nursery, scripted_target(greeting=b""))
    running = await start_ws_bridge(target, record=tmp_path)
    with trio.fail_after(20):
        client = await RawClient.open(running.port)
        await client.handshake()
        await client.send(client_frame(Opcode.CLOSE, b""))
        echoed = await client.read_frame()
        assert (echoed.opcode, echoed.data) == (Opcode.CLOSE, b"")
        (path,) = await running.recordings(1)
    recording = load_recording(path)
    assert recording.status.outcome is Outcome.COMPLETE, recording.status.describe()
    closes = [
        (direction, f.payload)
        for direction in (Direction.UP, Direction.DOWN)
        for f in recording.frames(direction)
        if f.kind is Kind.CLOSE
    ]
    assert closes == [(Direction.UP, b""), (Direction.DOWN, b"")]
