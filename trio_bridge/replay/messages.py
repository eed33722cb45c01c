"""Frames to messages: what ``serve`` compares, since clients choose their own framing.

A browser never fragments what it sends, but a recorded client might have, and the
comparison should not care: two clients that send the same messages match.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..observe import Direction
from ..recording import FrameRecord, GapRecord, Kind, Record


@dataclass(frozen=True, slots=True)
class Message:
    """One complete data message; ``time_us`` and ``offset`` are those of its first frame."""

    index: int  # 1-based, per direction
    text: bool
    payload: bytes
    time_us: int = 0
    offset: int = -1

    def same_as(self, other: Message) -> bool:
        return self.text == other.text and self.payload == other.payload


class MessageAssembler:
    """Feeds frames in, gets a :class:`Message` out each time one completes."""

    def __init__(self) -> None:
        self.count = 0
        self._parts: list[bytes] = []
        self._text = False
        self._time_us = 0
        self._offset = -1

    def feed(
        self, kind: Kind, fin: bool, payload: bytes, time_us: int = 0, offset: int = -1
    ) -> Message | None:
        if kind in (Kind.TEXT, Kind.BINARY):
            self._parts = [payload]
            self._text = kind is Kind.TEXT
            self._time_us, self._offset = time_us, offset
        elif kind is Kind.CONT:
            self._parts.append(payload)
        else:
            return None
        if not fin:
            return None
        self.count += 1
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        return Message(self.count, self._text, data, self._time_us, self._offset)


def recorded_messages(records: Iterable[Record], direction: Direction) -> Iterator[Message]:
    """The data messages one side sent, in order, streamed from a recording."""
    assembler = MessageAssembler()
    for record in records:
        if isinstance(record, FrameRecord) and record.direction is direction:
            message = assembler.feed(
                record.kind, record.fin, record.payload, record.time_us, record.offset
            )
            if message is not None:
                yield message


def describe_gap(gap: GapRecord) -> str:
    """The note every report carries for a gap: what follows it may differ because of
    the recording, not the live side."""
    return (
        f"the recording has a gap at {gap.time_us / 1e6:.3f} s ({gap.total_frames} frames "
        f"lost: {gap.reason}); divergences after it may come from the recording"
    )
