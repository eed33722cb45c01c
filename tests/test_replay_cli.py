"""The ``trio-bridge-replay`` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import codecs
import errno
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.observe import Direction
from trio_bridge.pytest_plugin import StartBridge
from trio_bridge.recording import EndRecord, GapRecord, Kind, load_recording
from trio_bridge.recording.format import HEADER_SIZE, Meta
from trio_bridge.recording.writer import RecordingFile
from trio_bridge.replay.cli import main
from trio_bridge.replay.messages import recorded_messages
from trio_bridge.replay.progress import Progress

from .recording_support import (
    BIG,
    GREETING,
    record_scripted_session,
    run_replay_cli,
    scripted_target,
    start_tcp_target,
)

REPLAY_MAIN = "import sys; from trio_bridge.replay.cli import main; sys.exit(main())"
REPLAY = [sys.executable, "-c", REPLAY_MAIN]


def replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``trio-bridge-replay ARGS`` in-process (show and export need no event loop)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
async def recording(nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path) -> Path:
    folder = tmp_path / "recorded"
    folder.mkdir()
    with trio.fail_after(20):
        return await record_scripted_session(nursery, start_ws_bridge, folder)


async def test_timeline_shows_every_frame_and_a_summary(
    recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = replay(capsys, str(recording))
    assert status == 0, err
    assert f"recording {recording}" in out and "subprotocol binary" in out
    assert re.search(r"\n +\d+\.\d{6}  up    binary         12  'RFB 003\.008\\n'\n", out)
    assert re.search(r"  up    binary\+         6  'frag1-'\n", out)
    assert re.search(r"  up    close           5  4000 'bye'\n", out)
    assert re.search(r"  ----  END      close 4000 by client \(bye\)\n", out)
    assert "up (client->target): 4 messages" in out
    assert "close: 4000 by client (bye)" in out and "file: complete" in out

    status, quiet, _ = replay(capsys, "show", "--no-payload", "--filter", "down", str(recording))
    assert status == 0
    rows = [line for line in quiet.splitlines() if re.match(r" +\d+\.\d{6}  ", line)]
    assert rows and all("  down  " in row or "  ----  " in row for row in rows)
    assert "'RFB" not in quiet

    _, full, _ = replay(capsys, "show", "--full", "--filter", "up", str(recording))
    hex_row = "00000000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|"
    assert hex_row in full


def test_broken_files_give_one_line_and_a_status(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tbrec"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    result = run_replay_cli(str(garbage))
    assert result.returncode == 2
    assert result.stderr == (
        f"trio-bridge-replay: {garbage}: offset 0: "
        "not a trio-bridge recording (wrong magic bytes)\n"
    )
    missing = run_replay_cli(str(tmp_path / "nope.tbrec"))
    assert missing.returncode == 2 and "No such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr


def cut_copy(recording: Path, folder: Path) -> Path:
    """The recording cut in the middle of the big client message."""
    (big,) = [f for f in load_recording(recording).frames(Direction.UP) if f.payload == BIG]
    cut = folder / "cut.tbrec"
    cut.write_bytes(recording.read_bytes()[: big.offset + 1000])
    return cut


async def test_a_cut_recording_prints_what_it_has_and_says_where_it_stops(
    recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = cut_copy(recording, tmp_path)
    status, out, err = replay(capsys, str(cut))
    assert status == 1
    (line,) = err.splitlines()
    assert re.fullmatch(
        rf"trio-bridge-replay: {re.escape(str(cut))}: truncated at offset \d+: the file ends "
        rf"inside a record \({1000 - HEADER_SIZE} of {len(BIG)} payload bytes present\)",
        line,
    )
    assert "  up    binary         12" in out and "file: truncated at offset" in out


async def test_export_writes_websockifys_format(
    recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "session.js"
    args = ["export", str(recording), "-o", str(out)]  # websockify, the only format
    status, _, err = replay(capsys, *args)
    assert status == 0, err
    lines = read_lines(out)
    assert lines[0] == "var VNC_frame_data = [" and lines[-1] == "'EOF'];"
    entries = []
    for line in lines[1:-1]:
        match = re.fullmatch(r"'([{}])(\d+)\1(.*)',", line)
        assert match, line
        data = codecs.decode(match.group(3), "unicode_escape").encode("latin-1")
        entries.append((match.group(1), int(match.group(2)), data))
    recorded = load_recording(recording)
    up = [m.payload for m in recorded_messages(recorded.records, Direction.UP)]
    down = [m.payload for m in recorded_messages(recorded.records, Direction.DOWN)]
    assert [data for marker, _, data in entries if marker == "}"] == up
    assert [data for marker, _, data in entries if marker == "{"] == down
    assert entries[0] == ("{", entries[0][1], GREETING)  # the server speaks first
    times = [ms for _, ms, _ in entries]
    assert times == sorted(times)
    assert BIG in up


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_drive_exits_0_when_the_server_matches_and_1_when_not(
    nursery: trio.Nursery, recording: Path
) -> None:
    same = await start_tcp_target(nursery, scripted_target())
    changed = await start_tcp_target(nursery, scripted_target(greeting=b"RFB 003.003\n"))
    with trio.fail_after(30):
        ok = await trio.run_process(
            [*REPLAY, "drive", str(recording), "--target", str(same), "--no-delay"],
            capture_stdout=True,
            check=False,
        )
        bad = await trio.run_process(
            [*REPLAY, "drive", str(recording), "--target", str(changed), "--no-delay"],
            capture_stdout=True,
            check=False,
        )
        down = await trio.run_process(
            [*REPLAY, "drive", str(recording), "--target", "127.0.0.1:9", "--timeout", "2"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.decode().splitlines()[-1].startswith("result: same as the recording")
    assert bad.returncode == 1
    assert "@@ target->client message #1, byte 10, " in bad.stdout.decode()
    # As documented: one line on stderr, nothing on stdout.
    assert down.returncode == 2 and down.stdout == b""
    (line,) = down.stderr.decode().splitlines()
    assert line.startswith("trio-bridge-replay: cannot connect to 127.0.0.1:9")


async def test_serve_once_replays_to_one_client_and_reports(recording: Path) -> None:
    command = [*REPLAY, "serve", str(recording), "--listen", "127.0.0.1:0", "--once", "--no-delay"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            banner = b""
            while b"\n" not in banner:
                banner += await process.stdout.receive_some(1000)
            match = re.search(rb"on (ws://127\.0\.0\.1:\d+/)", banner)
            assert match, banner
            async with connect(match.group(1).decode(), subprotocols=[Subprotocol("binary")]) as ws:
                assert await ws.recv() == GREETING
                await ws.send(b"not what the recording has")
            rest = b""
            async for chunk in process.stdout:
                rest += chunk
            assert await process.wait() == 1
    finally:
        if process.returncode is None:
            process.kill()
    report = rest.decode()
    assert "@@ client->target message #1, byte 0, recorded at" in report
    assert "  received binary 26 B 'not what the" in report
    assert report.splitlines()[-1].endswith(": DIFFERENT")


async def test_serve_once_is_not_used_up_by_a_probe(recording: Path) -> None:
    """A connection that never completes the WebSocket handshake (a port probe, a plain
    HTTP request) is not the one client --once serves."""
    args = ["serve", str(recording), "--listen", "127.0.0.1:0", "--once", "--no-delay"]
    with trio.fail_after(20):
        async with replaying(*args) as replay_process:
            await serve_once_after_probes(replay_process)


async def serve_once_after_probes(replay_process: Replaying) -> None:
    banner = await replay_process.read_until(b"\n")
    match = re.search(rb"on (ws://127\.0\.0\.1:(\d+)/)", banner)
    assert match, banner
    url, port = match.group(1).decode(), int(match.group(2))
    probe = await trio.open_tcp_stream("127.0.0.1", port)
    await probe.aclose()  # connected, said nothing
    plain = await trio.open_tcp_stream("127.0.0.1", port)
    await plain.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await plain.receive_some(100)).startswith(b"HTTP/1.1 4")
    await plain.aclose()
    async with connect(url, subprotocols=[Subprotocol("binary")]) as ws:
        assert await ws.recv() == GREETING
    # It served that client (which sent nothing: DIFFERENT), then exited.
    assert await replay_process.process.wait() == 1


# -- Ctrl-C ------------------------------------------------------------------------------------

V1_RECORDING = Path(__file__).parent / "data" / "recording-v1.tbrec"  # down first, then up


class Replaying:
    """A ``trio-bridge-replay`` subprocess, its stdout read up to a line when asked."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = b""

    async def read_until(self, fragment: bytes) -> bytes:
        assert self.process.stdout is not None
        while fragment not in self.stdout:
            chunk = await self.process.stdout.receive_some()
            assert chunk, self.stdout
            self.stdout += chunk
        return self.stdout

    async def interrupt(self) -> tuple[int, bytes]:
        """SIGINT, as Ctrl-C sends it; the exit status and everything on stderr."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.stdout is not None and self.process.stderr is not None
        stdout, stderr = self.process.stdout, self.process.stderr
        chunks: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for stream in (stdout, stderr):
                nursery.start_soon(_read_all, stream, chunks if stream is stderr else [])
        return await self.process.wait(), b"".join(chunks)


async def _read_all(stream: trio.abc.ReceiveStream, into: list[bytes]) -> None:
    async for chunk in stream:
        into.append(bytes(chunk))


@asynccontextmanager
async def replaying(*args: str) -> AsyncIterator[Replaying]:
    process = await trio.lowlevel.open_process(
        [*REPLAY, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield Replaying(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdout, process.stderr):
                assert pipe is not None
                await pipe.aclose()


def assert_interrupted_quietly(status: int, stderr: bytes) -> None:
    assert status == 130 and stderr == b"", (status, stderr.decode())


async def test_ctrl_c_stops_serve_with_130_and_nothing_on_stderr() -> None:
    """Trio wrapped the KeyboardInterrupt in a group: a traceback and status 1."""
    with trio.fail_after(20):
        async with replaying("serve", str(V1_RECORDING), "--listen", "127.0.0.1:0") as run:
            await run.read_until(b"serving session")
            assert_interrupted_quietly(*await run.interrupt())


async def test_ctrl_c_stops_serve_with_a_client_connected() -> None:
    with trio.fail_after(20):
        async with replaying(
            "serve", str(V1_RECORDING), "--listen", "127.0.0.1:0", "--lockstep"
        ) as run:
            banner = await run.read_until(b"\n")
            url = re.search(rb"on (ws://127\.0\.0\.1:\d+/)", banner)
            assert url, banner
            async with connect(url[1].decode(), subprotocols=[Subprotocol("binary")]) as ws:
                await ws.recv()  # the recorded greeting; lockstep now waits for the client
                assert_interrupted_quietly(*await run.interrupt())


async def test_ctrl_c_stops_drive_while_it_waits_for_the_server(nursery: trio.Nursery) -> None:
    accepted = trio.Event()
    silent: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        silent.append(stream)  # never answers, never closes
        accepted.set()
        await trio.sleep_forever()

    (listener,) = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    with trio.fail_after(20):
        async with replaying(
            "drive", str(V1_RECORDING), "--target", f"127.0.0.1:{port}", "--timeout", "60"
        ) as run:
            await accepted.wait()
            assert_interrupted_quietly(*await run.interrupt())


@pytest.mark.parametrize("command", [["show"], ["export", "--format", "websockify"]])
async def test_ctrl_c_stops_show_and_export_blocked_on_their_input(
    tmp_path: Path, command: list[str]
) -> None:
    """A FIFO that nothing writes to yet: the command waits in open() or read()."""
    fifo = tmp_path / "live.tbrec"
    os.mkfifo(fifo)
    with trio.fail_after(20):
        async with replaying(*command, str(fifo)) as run:
            writer = await _open_writer_once_read(fifo)
            try:
                assert_interrupted_quietly(*await run.interrupt())
            finally:
                os.close(writer)


async def _open_writer_once_read(fifo: Path) -> int:
    """The FIFO's write end, once the command opened it for reading (ENXIO until then).
    Polled: another process's open() sends no event."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        await trio.sleep(0.01)


# -- gaps and the progress line ------------------------------------------------------------------


def gap_recording(path: Path) -> Path:
    """A complete recording (END record) with a gap in the middle."""
    gap = GapRecord(2_500, 2_500, 0, 0, 1, 3, "test").encode()
    end = EndRecord(5_000, 1000, "", "client").encode()
    file = RecordingFile(path)
    file.append([(Kind.META, 0, 0, Meta("7157ed00", "c:1", "t:2", "/", None, 0.0).encode())])
    file.append(
        [
            (Kind.BINARY, 0x03, 1_000, b"before"),
            (Kind.GAP, 0, 2_500, gap),
            (Kind.BINARY, 0x03, 3_000, b"after"),
            (Kind.END, 0, 5_000, end),
        ]
    )
    file.close(sync=False)
    return path


def test_gaps_are_reported_and_show_strict_fails_on_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = gap_recording(tmp_path / "gap.tbrec")
    status, out, err = replay(capsys, str(path))
    assert status == 0 and "gaps: 1, 1 frames (3 bytes) were not recorded" in out, out + err
    status, out, err = replay(capsys, "show", "--strict", str(path))
    assert status == 1
    assert (
        err
        == f"trio-bridge-replay: {path}: the recording has 1 gap (frames were lost) (--strict)\n"
    )
    status, _, err = replay(capsys, "export", str(path), "-o", str(tmp_path / "gap.js"))
    assert status == 0
    assert f"trio-bridge-replay: {path}: note: the recording has a gap at 0.003 s" in err


def test_the_progress_line_fits_an_80_column_terminal() -> None:
    """Each redraw stays on one row: a line of 80 characters or more wraps, and the
    next carriage return redraws only the last row, leaving stale lines behind."""
    main_fd, terminal_fd = os.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    with os.fdopen(terminal_fd, "w") as terminal:
        long_name = "recordings/" + "20261207T105736.132798Z_9ae6d336_127.0.0.1-56092" * 3
        progress = Progress(f"driving {long_name}.tbrec", 1000, terminal)
        assert progress.enabled
        for done in range(0, 1001, 250):
            progress._last = 0.0  # every update redraws (ten a second otherwise)
            progress.update(done, f"{done / 100:.1f} s played")
        progress.finish()
    output = b""
    while chunk := _read_pty(main_fd):
        output += chunk
    os.close(main_fd)
    redraws = [r for r in output.decode().split("\r") if r.strip("\x1b[K\n")]
    assert len(redraws) == 5, redraws
    for line in redraws:
        visible = line.replace("\x1b[K", "")
        assert len(visible) <= 79 and "\n" not in visible, visible
    assert redraws[-1].startswith("100.0 %  10.0 s played  driving recordings/")


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536) if select.select([fd], [], [], 0)[0] else b""
    except OSError:  # EIO: the terminal side is closed and drained
        return b""


def test_usage_errors_of_compare_images_and_web(
    recording_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive_args = ["drive", str(recording_file), "--target", "127.0.0.1:9"]
    cases = [
        ([*drive_args, "--compare", "pixels"], "--compare: unknown comparator 'pixels'"),
        ([*drive_args, "--compare", "no_such_module:x"], "--compare: No module named"),
        ([*drive_args, "--images", str(tmp_path)], "--images needs --compare rfb"),
        (["serve", str(recording_file), "--web", str(tmp_path)], f"--web {tmp_path}: no vnc.html"),
    ]
    for args, message in cases:
        status, out, err = replay(capsys, *args)
        assert status == 2 and out == "", (args, out)
        (line,) = err.splitlines()
        assert line.startswith(f"trio-bridge-replay: {message}"), line


@pytest.fixture
def recording_file(tmp_path: Path) -> Path:
    return gap_recording(tmp_path / "any.tbrec")
