"""trio-bridge-replay's serve and drive, in-process, against a recorded scripted session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from trio_bridge.observe import Direction
from trio_bridge.pytest_plugin import StartBridge, StartReplay
from trio_bridge.recording import GapRecord, Kind, load_recording
from trio_bridge.recording.format import Meta
from trio_bridge.recording.writer import RecordingFile
from trio_bridge.replay import Message, StreamComparator, drive, make_comparator

from .recording_support import (
    BIG,
    CLOSE_CODE,
    CLOSE_REASON,
    FRAGMENTS,
    GREETING,
    record_scripted_session,
    scripted_target,
    start_tcp_target,
)


@pytest.fixture
async def recording(nursery: trio.Nursery, start_ws_bridge: StartBridge, tmp_path: Path) -> Path:
    folder = tmp_path / "recorded"
    folder.mkdir()
    with trio.fail_after(20):
        return await record_scripted_session(nursery, start_ws_bridge, folder)


def recorded_down(path: Path) -> list[bytes]:
    """The target's data frames in a recording, one payload per frame."""
    return [f.payload for f in load_recording(path).frames(Direction.DOWN) if f.is_data]


async def play_recorded_client(
    url: str,
    frames: int,
    *,
    text: str = "hello text",
    messages: Sequence[str | bytes | list[bytes]] | None = None,
) -> list[bytes]:
    """Send the recorded client's messages (or ``messages``) to ``url`` and collect
    ``frames`` data frames."""
    received: list[bytes] = []
    async with connect(
        url, subprotocols=[Subprotocol("binary")], ping_interval=None, max_size=None
    ) as ws:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def reader(ws: ClientConnection = ws) -> None:
                while len(received) < frames:
                    message = await ws.recv()
                    assert isinstance(message, bytes)
                    received.append(message)
                done.set()

            nursery.start_soon(reader)
            for message in messages or [GREETING, text, FRAGMENTS, BIG]:
                await ws.send(message)
            await (await ws.ping(b"are you there")).wait()
            await done.wait()
        await ws.aclose(CLOSE_CODE, CLOSE_REASON)
    return received


async def test_serve_sends_the_recorded_frames_byte_for_byte(
    recording: Path, start_replay_server: StartReplay
) -> None:
    server = await start_replay_server(recording, lockstep=True, delay=False)
    expected = recorded_down(recording)
    with trio.fail_after(20):
        received = await play_recorded_client(server.url, len(expected))
        (report,) = await server.wait_reports(1)
    assert received == expected
    assert report.ok, report.lines()
    assert report.matched == report.expected_messages == 4


async def test_serve_reports_a_client_message_that_differs(
    recording: Path, start_replay_server: StartReplay
) -> None:
    server = await start_replay_server(recording, lockstep=True, delay=False)
    with trio.fail_after(20):
        await play_recorded_client(server.url, len(recorded_down(recording)), text="hello TEXT")
        (report,) = await server.wait_reports(1)
    assert not report.ok and report.matched == 3
    (difference,) = report.differences
    assert difference.index == 2 and difference.kind == "different"
    text = "\n".join(report.lines())
    assert "@@ client->target message #2, byte 18, recorded at " in text
    assert (
        "  recorded text 10 B 'hello text'" in text and "  received text 10 B 'hello TEXT'" in text
    )
    assert "- 00000012  74 65 78 74" in text and "+ 00000012  54 45 58 54" in text
    assert text.endswith("DIFFERENT")


async def test_serve_aligns_the_clients_messages_after_a_missing_and_an_extra_one(
    recording: Path, start_replay_server: StartReplay
) -> None:
    """A client that moves the mouse once more and skips a message: two differences,
    each reported once, and the messages after them match again (by position, every
    later message differed)."""
    # Lockstep: without it both sides would send 200 KiB at once, which can stall
    # websockets 17's Trio connections (a reader waits for the writer's lock).
    server = await start_replay_server(recording, lockstep=True, delay=False)
    sent: list[str | bytes | list[bytes]] = [GREETING, b"mouse move", "hello text", BIG]
    with trio.fail_after(20):
        await play_recorded_client(server.url, len(recorded_down(recording)), messages=sent)
        (report,) = await server.wait_reports(1)
    assert report.matched == 3 and report.expected_messages == 4 and report.client_messages == 4
    extra, missing = report.differences
    assert (extra.kind, extra.index, extra.got) == ("extra", 2, b"mouse move")
    assert (missing.kind, missing.index) == ("missing", 3)
    assert missing.expected.startswith(b"frag1-frag2-frag3")
    text = "\n".join(report.lines())
    assert "@@ client->target message #2, byte 12, received at " in text
    assert ": extra (0 recorded, 1 received) @@" in text
    assert ": missing (1 recorded, 0 received) @@" in text


UP, DOWN = 0x01, 0x03  # record flags of a final frame each way


def write_recording(path: Path, frames: list[tuple[Kind, int, int, bytes]]) -> Path:
    """A recording of ``frames`` (kind, flags, time in µs, payload), without an END."""
    file = RecordingFile(path)
    file.append([(Kind.META, 0, 0, Meta("7157ed00", "c:1", "t:2", "/", None, 0.0).encode())])
    file.append(frames)
    file.close(sync=False)
    return path


def timed_recording(path: Path) -> Path:
    """Two target messages 400 ms apart, then the target closes."""
    return write_recording(
        path,
        [
            (Kind.BINARY, DOWN, 1_000, b"first"),
            (Kind.BINARY, DOWN, 401_000, b"second"),
            (Kind.CLOSE, DOWN, 402_000, b"\x03\xe8target closed the connection"),
        ],
    )


@pytest.mark.parametrize("speed, delay, low, high", [(2.0, True, 0.19, 0.35), (1.0, False, 0, 0.1)])
async def test_serve_keeps_the_recorded_timing_scaled_by_speed(
    tmp_path: Path,
    start_replay_server: StartReplay,
    speed: float,
    delay: bool,
    low: float,
    high: float,
) -> None:
    path = timed_recording(tmp_path / "t.tbrec")
    server = await start_replay_server(path, speed=speed, delay=delay)
    with trio.fail_after(10):
        async with connect(server.url) as ws:
            assert await ws.recv() == b"first"
            first = trio.current_time()
            assert await ws.recv() == b"second"
            gap = trio.current_time() - first
            await ws.wait_closed()
        assert ws.close_code == 1000 and ws.close_reason == "target closed the connection"
        (report,) = await server.wait_reports(1)
    assert low <= gap <= high
    assert report.ok, report.lines()


async def test_serve_sends_a_fragmented_message_then_the_recorded_close(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    """A text message in two frames (a character split between them), then a close right
    after: websockets refuses a close in the middle of a message (1011), so the player
    waits until the message has gone."""
    path = write_recording(
        tmp_path / "fragmented.tbrec",
        [
            (Kind.TEXT, 0x02, 1_000, b"caf\xc3"),
            (Kind.CONT, DOWN, 2_000, b"\xa9 ok"),
            (Kind.CLOSE, DOWN, 3_000, (4000).to_bytes(2, "big") + b"done"),
        ],
    )
    server = await start_replay_server(path, delay=False)
    with trio.fail_after(10):
        async with connect(server.url) as ws:
            assert await ws.recv() == "caf\u00e9 ok"
            await ws.wait_closed()
        assert ws.close_code == 4000 and ws.close_reason == "done"
        (report,) = await server.wait_reports(1)
    assert report.ok, report.lines()
    assert report.sent_frames == 3


def questions_recording(path: Path, answer: bytes = b"answer", close: int = 4001) -> Path:
    """The client asks q1 and q2; the target answers q1 (before a gap), then closes."""
    gap = GapRecord(2_500, 2_500, 0, 0, 1, 3, "test").encode()
    return write_recording(
        path,
        [
            (Kind.TEXT, UP, 1_000, b"q1"),
            *([(Kind.BINARY, DOWN, 2_000, answer)] if answer else []),
            (Kind.GAP, 0, 2_500, gap),
            (Kind.TEXT, UP, 3_000, b"q2"),
            (Kind.CLOSE, DOWN, 4_000, close.to_bytes(2, "big") + b"bye"),
        ],
    )


async def test_serve_in_lockstep_notes_a_client_that_closes_before_its_message(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    path = questions_recording(tmp_path / "q.tbrec")
    server = await start_replay_server(path, lockstep=True, delay=False)
    with trio.fail_after(10):
        async with connect(server.url):
            pass
        (report,) = await server.wait_reports(1)
    assert not report.ok and report.sent_frames == 0
    assert report.note == "the client closed the connection early"


async def test_serve_in_lockstep_says_what_it_waits_for_and_gives_up_after_its_timeout(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    path = questions_recording(tmp_path / "q.tbrec")
    waits: list[tuple[str, str]] = []
    server = await start_replay_server(
        path, lockstep=True, delay=False, lockstep_timeout=1.5, on_wait=lambda *w: waits.append(w)
    )
    with trio.fail_after(10):
        async with connect(server.url) as ws:
            await ws.send("q1")
            assert await ws.recv() == b"answer"
            # q2 is never sent: after 1 s the server says so; after 1.5 s it plays on.
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        (report,) = await server.wait_reports(1)
    ((client, waiting),) = waits
    assert client == report.client
    assert waiting == "lockstep: waiting for client message #2 (recorded at 0.003 s): text 2 B 'q2'"
    assert report.notes[-1] == (
        "lockstep: client message #2 (recorded at 0.003 s) did not come within 1.5 s; "
        "the rest was played without waiting"
    )
    assert report.notes[0].startswith("the recording has a gap at 0.003 s (1 frames lost: test)")
    assert "note: the recording has a gap" in "\n".join(report.lines())


async def test_serve_plays_an_unfinished_recording_to_its_end_and_awaits_the_last_reply(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    """A recording that stops mid-session (no close): the server's last message goes out
    and the client's recorded reply to it is still compared, then the server closes."""
    path = write_recording(
        tmp_path / "unfinished.tbrec",
        [(Kind.BINARY, DOWN, 1_000, b"question"), (Kind.BINARY, UP, 2_000, b"reply")],
    )
    server = await start_replay_server(path, delay=False)
    with trio.fail_after(10):
        async with connect(server.url) as ws:
            assert await ws.recv() == b"question"
            await ws.send(b"reply")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1000
        (report,) = await server.wait_reports(1)
    assert report.ok, report.lines()
    assert report.matched == report.expected_messages == 1


# -- drive -----------------------------------------------------------------------------------


async def test_drive_matches_the_recorded_target_directly_and_through_a_bridge(
    nursery: trio.Nursery, recording: Path, start_ws_bridge: StartBridge
) -> None:
    target = await start_tcp_target(nursery, scripted_target())
    bridge = await start_ws_bridge(target)
    with trio.fail_after(20):
        direct = await drive(recording, target=target, delay=False)
        bridged = await drive(recording, url=bridge.url, delay=False)
    for report in (direct, bridged):
        assert report.ok, "\n".join(report.lines())
        assert report.received_bytes == report.expected_bytes > len(BIG)
        assert report.sent_messages == 4
    assert bridged.lines()[-1] == "result: same as the recording (4 client messages sent)"


async def test_drive_reports_where_a_changed_target_diverges(
    nursery: trio.Nursery, recording: Path
) -> None:
    def corrupt(chunk: bytes) -> bytes:
        return chunk.replace(b"frag2", b"FRAG2")

    changed = await start_tcp_target(
        nursery, scripted_target(greeting=b"RFB 003.007\n", transform=corrupt)
    )
    comparator = StreamComparator()
    with trio.fail_after(20):
        report = await drive(recording, target=changed, delay=False, timeout=2, compare=comparator)
    assert not report.ok
    first, second = comparator.found
    assert first.byte == 10 and first.expected.startswith(b"8\n") and first.got.startswith(b"7\n")
    frag2 = len(GREETING * 2 + b"hello text" + b"frag1-")
    assert second.byte == frag2 and second.got.startswith(b"FRAG2")
    assert (first.index, second.index) == (1, 5)
    lines = report.lines()
    assert lines[2].startswith("@@ target->client message #1, byte 10, recorded at 0.0")
    assert lines[2].endswith(": different (1 recorded, 1 received) @@")
    assert lines[3:5] == [
        "  recorded binary 12 B 'RFB 003.008\\n'",
        "  received binary 12 B 'RFB 003.007\\n'",
    ]
    assert lines[5].startswith("- 0000000a  38 0a") and lines[6].startswith("+ 0000000a  37 0a")
    assert lines[-1].startswith("result: DIFFERENT")


@pytest.mark.parametrize(
    "old, new, kind",
    [
        (b"hello text", b"hello text" + b"INSERTED BY THE SERVER", "extra"),
        (b"frag2-", b"", "missing"),
    ],
)
async def test_drive_resynchronises_after_an_inserted_or_missing_message(
    nursery: trio.Nursery, recording: Path, old: bytes, new: bytes, kind: str
) -> None:
    """One divergence, reported once: what follows it is aligned again (by offsets, every
    later byte would have been "shifted")."""
    changed = await start_tcp_target(
        nursery, scripted_target(transform=lambda c: c.replace(old, new))
    )
    comparator = StreamComparator()
    with trio.fail_after(20):
        report = await drive(recording, target=changed, delay=False, timeout=1, compare=comparator)
    (divergence,) = comparator.found
    assert divergence.kind == kind, report.lines()
    assert (divergence.expected or divergence.got).startswith(
        old if kind == "missing" else new[len(old) :]
    )
    assert comparator.matched == len(comparator.expected) - (kind == "missing")
    assert len(report.findings) == 1
    # A missing answer may be waited for (once: later messages are sent without waiting;
    # whether a client message comes between it and the next answer depends on the
    # recording's timing); an extra one never is.
    assert len(report.stalls) <= (kind == "missing")


async def test_drive_ignores_how_the_server_cuts_its_bytes(
    nursery: trio.Nursery, recording: Path
) -> None:
    async def dribble(stream: trio.SocketStream) -> None:
        """The scripted target, its answers sent in pieces of 7 bytes."""
        try:
            await stream.send_all(GREETING[:5])
            await stream.send_all(GREETING[5:])
            async for chunk in stream:
                for i in range(0, len(chunk), 7):
                    await stream.send_all(bytes(chunk[i : i + 7]))
        except trio.BrokenResourceError:
            pass

    target = await start_tcp_target(nursery, dribble)
    with trio.fail_after(20):
        report = await drive(recording, target=target, delay=False, timeout=2)
    assert report.ok, "\n".join(report.lines())


async def test_drive_reports_a_server_that_stops_early(
    nursery: trio.Nursery, recording: Path
) -> None:
    async def hang_up_after_greeting(stream: trio.SocketStream) -> None:
        await stream.send_all(GREETING)
        await stream.receive_some(100)

    early = await start_tcp_target(nursery, hang_up_after_greeting)
    comparator = StreamComparator()
    with trio.fail_after(20):
        report = await drive(recording, target=early, delay=False, timeout=2, compare=comparator)
    assert not report.ok
    assert report.received_bytes == len(GREETING)
    (missing,) = comparator.found
    assert missing.kind == "missing" and missing.index == 2 and missing.byte == len(GREETING)
    assert missing.expected_count == len(comparator.expected) - 1
    text = "\n".join(report.lines())
    assert f"byte {len(GREETING)}, recorded at" in text and "+ (nothing)" in text


async def test_drive_through_websocket_matches_serve_of_the_same_recording(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    path = questions_recording(tmp_path / "q.tbrec")
    server = await start_replay_server(path, lockstep=True, delay=False)
    with trio.fail_after(10):
        report = await drive(path, url=server.url, delay=False, timeout=5)
    assert report.ok, "\n".join(report.lines())
    assert report.sent_messages == 2 and report.received_bytes == len(b"answer")
    (note,) = report.notes
    assert note.startswith("the recording has a gap at 0.003 s (1 frames lost: test)")


async def test_drive_reports_a_server_that_stalls_and_closes_with_another_code(
    tmp_path: Path, start_replay_server: StartReplay
) -> None:
    other = questions_recording(tmp_path / "other.tbrec", answer=b"", close=4002)
    server = await start_replay_server(other, lockstep=True, delay=False)
    with trio.fail_after(10):
        comparator = StreamComparator()
        report = await drive(
            questions_recording(tmp_path / "q.tbrec"),
            url=server.url,
            timeout=0.5,
            compare=comparator,
        )
    assert not report.ok
    (missing,) = comparator.found
    assert missing.kind == "missing" and missing.expected == b"answer"
    assert report.close_problem == "recorded close 4001 'bye', got close 4002 'bye'"
    (stall,) = report.stalls
    assert stall.startswith("before the client message at 0.003 s: waited 0.5 s for the")


async def test_drive_lets_the_server_finish_before_the_recorded_close(
    nursery: trio.Nursery, recording: Path, start_ws_bridge: StartBridge
) -> None:
    """After a stall (a shorter greeting: the byte count never catches up), messages go
    without waiting, but the close still waits for the server's answer: sent at once, it
    would cut the server off through the bridge, and the report would blame the server
    for the bytes it never had the time to send."""
    shorter = await start_tcp_target(nursery, scripted_target(greeting=b"RFB 003.8\n"))
    bridge = await start_ws_bridge(shorter)
    comparator = StreamComparator()
    with trio.fail_after(20):
        report = await drive(recording, url=bridge.url, delay=False, timeout=1, compare=comparator)
    (divergence,) = comparator.found
    assert divergence.index == 1 and divergence.got == b"8\n", report.lines()
    assert len(report.stalls) == 1 and report.received_bytes == report.expected_bytes - 2


@pytest.mark.parametrize(
    "answer, compare, same",
    [
        (b"ANSWER", "bytes", False),
        (b"ANSWER", "messages", False),
        (b"ANSWER", "lengths", True),  # a time stamp, say: same size, other bytes
        (b"longer answer", "lengths", False),
        (b"longer answer", "none", True),  # only the close is compared
    ],
)
async def test_drive_compare_modes(
    tmp_path: Path, start_replay_server: StartReplay, answer: bytes, compare: str, same: bool
) -> None:
    other = questions_recording(tmp_path / "other.tbrec", answer=answer)
    server = await start_replay_server(other, lockstep=True, delay=False)
    with trio.fail_after(10):
        report = await drive(
            questions_recording(tmp_path / "q.tbrec"), url=server.url, timeout=2, compare=compare
        )
    assert report.ok is same, report.lines()
    assert report.lines()[1].endswith(f"; compared: {compare})")


class CaseInsensitive(StreamComparator):
    """A comparator plug-in (docs/replay.md): the byte comparison, ignoring ASCII case."""

    def __init__(self) -> None:
        super().__init__(mode="bytes", name="case-insensitive")

    def expect(self, message: Message) -> None:
        super().expect(replace(message, payload=message.payload.lower()))

    def receive(self, message: Message) -> None:
        super().receive(replace(message, payload=message.payload.lower()))


async def test_drive_with_a_comparator_plug_in(nursery: trio.Nursery, recording: Path) -> None:
    shouting = await start_tcp_target(
        nursery, scripted_target(transform=lambda c: c.replace(b"frag2", b"FRAG2"))
    )
    by_name = make_comparator("tests.test_replay:CaseInsensitive")  # as --compare MODULE:NAME
    assert isinstance(by_name, CaseInsensitive)
    with trio.fail_after(20):
        plain = await drive(recording, target=shouting, delay=False, timeout=2)
        report = await drive(recording, target=shouting, delay=False, timeout=2, compare=by_name)
    assert not plain.ok
    assert report.ok, report.lines()
    assert "; compared: case-insensitive)" in report.lines()[1]
