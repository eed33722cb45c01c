"""The rfb comparator's screens where no server can be made to send what is tested:
what a recording sent as Tight JPEG is not decoded, so it is left out of the comparison
(and said so), until something paints it again. (x11vnc sends JPEG for an xterm's text
to noVNC, which asks for quality level 6: see docs/replay.md.)"""

from __future__ import annotations

from trio_bridge.replay.rfb import RfbComparator
from trio_bridge.replay.rfb_encodings import TightDecoder
from trio_bridge.replay.screen import PixelFormat, Screen

RED, BLUE = b"\xff\x00\x00\x00", b"\x00\x00\xff\x00"
FORMAT = PixelFormat(shifts=(0, 8, 16))  # noVNC's: red in the first byte


def screen(colour: bytes = RED) -> Screen:
    painted = Screen(8, 4, FORMAT)
    painted.fill(0, 0, 8, 4, colour)
    return painted


def test_a_tight_jpeg_rectangle_is_skipped_and_marked_unknown() -> None:
    target = screen()
    jpeg = b"\xff\xd8 not really a jpeg"
    body = bytes([0x90, len(jpeg)]) + jpeg + b"next rectangle"
    used = TightDecoder().decode(target, 2, 1, 3, 2, memoryview(body))
    assert used == 2 + len(jpeg)
    assert target.unknown_pixels == 6
    assert [target.unknown[y * 8 + x] for y in (1, 2) for x in (1, 2, 3, 4, 5)] == [
        0, 1, 1, 1, 0, 0, 1, 1, 1, 0,
    ]  # fmt: skip
    target.copy(2, 1, 5, 2, 3, 2)  # CopyRect carries what is unknown along
    assert target.unknown[3 * 8 + 5 : 3 * 8 + 8] == b"\x01\x01\x01"
    target.fill(0, 0, 8, 4, BLUE)  # painted again: known
    assert 1 not in target.unknown


def comparator_with(recorded: Screen, live: Screen) -> RfbComparator:
    comparator = RfbComparator()
    comparator.recorded.screen, comparator.live.screen = recorded, live
    return comparator


def test_unknown_pixels_are_not_compared_and_the_report_says_so() -> None:
    recorded, live = screen(), screen()
    recorded.mark_unknown(0, 0, 4, 4)  # the recording had a JPEG on the left half
    live.fill(0, 0, 4, 4, BLUE)  # and the live server shows something else there
    comparator = comparator_with(recorded, live)
    assert comparator.findings() == []
    (note,) = comparator.notes
    assert note.startswith("rfb: 16 pixels of the recorded screen came as JPEG")

    live.fill(6, 3, 1, 1, BLUE)  # a difference where the recording is known
    (finding,) = comparator_with(recorded, live).findings()
    assert "region x=6 y=3 1x1: 1 pixels differ" in "\n".join(finding.lines())
