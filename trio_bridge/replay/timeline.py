"""The default view: a recording as a readable timeline, then a summary.

One line per record (time since the session opened, direction, kind, payload size,
a preview), streamed: a gigabyte recording prints with the memory of one record.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from ..observe import Direction
from ..recording import EndRecord, FrameRecord, GapRecord, Kind, Record, RecordingReader
from ..recording.reader import ReadStatus
from .preview import hexdump, looks_like_text, one_line

DIRECTION_LABEL = {Direction.UP: "up", Direction.DOWN: "down"}
TEXT_WIDTH = 96  # --full wraps long text lines here


class PayloadView(enum.Enum):
    PREVIEW = "preview"
    FULL = "full"
    NONE = "none"


@dataclass
class DirectionTotals:
    frames: int = 0
    messages: int = 0
    data_bytes: int = 0
    pings: int = 0
    pongs: int = 0


@dataclass
class Summary:
    """Totals over the whole recording (whatever is filtered out of the timeline)."""

    totals: dict[Direction, DirectionTotals] = field(
        default_factory=lambda: {d: DirectionTotals() for d in Direction}
    )
    last_us: int = 0
    gaps: int = 0
    lost_frames: int = 0
    lost_bytes: int = 0
    end: EndRecord | None = None
    closes: list[FrameRecord] = field(default_factory=list)

    def add(self, record: Record) -> None:
        self.last_us = max(self.last_us, record.time_us)
        if isinstance(record, GapRecord):
            self.gaps += 1
            self.lost_frames += record.total_frames
            self.lost_bytes += record.total_bytes
            self.last_us = max(self.last_us, record.until_us)
        elif isinstance(record, EndRecord):
            self.end = record
        else:
            totals = self.totals[record.direction]
            totals.frames += 1
            if record.is_data:
                totals.data_bytes += len(record.payload)
                totals.messages += record.fin
            elif record.kind is Kind.PING:
                totals.pings += 1
            elif record.kind is Kind.PONG:
                totals.pongs += 1
            elif record.kind is Kind.CLOSE:
                self.closes.append(record)

    def lines(self, status: ReadStatus) -> Iterator[str]:
        yield f"duration: {self.last_us / 1e6:.6f} s"
        for direction in Direction:
            t = self.totals[direction]
            yield (
                f"{DIRECTION_LABEL[direction]:>4} ({direction.value}): {t.messages} messages, "
                f"{t.data_bytes} bytes in {t.frames} frames; {t.pings} pings, {t.pongs} pongs"
            )
        if self.end is not None:
            code = self.end.close_code if self.end.close_code is not None else "none"
            reason = self.end.close_reason or "no reason"
            yield f"close: {code} by {self.end.closed_by or 'unknown'} ({reason})"
        elif self.closes:
            first = self.closes[0]
            first_code, reason = first.close_code_reason()
            who = "client" if first.direction is Direction.UP else "bridge"
            yield f"close: {first_code} by {who} ({reason or 'no reason'}); no END record"
        else:
            yield "close: none recorded"
        if self.gaps:
            yield (
                f"gaps: {self.gaps}, {self.lost_frames} frames ({self.lost_bytes} bytes) "
                "were not recorded"
            )
        yield f"file: {status.describe()}"


def _header(reader: RecordingReader) -> Iterator[str]:
    meta = reader.meta
    yield f"recording {reader.name}"
    yield f"session   {meta.session_id}, started {meta.started_utc}"
    yield f"client    {meta.client} -> target {meta.target}"
    yield f"path      {meta.path}, subprotocol {meta.subprotocol or '(none)'}"
    if meta.writer:
        yield f"writer    {meta.writer}"
    if meta.options:
        yield f"options   {json.dumps(meta.options, sort_keys=True)}"
    yield ""
    yield f"{'TIME (s)':>12}  {'DIR':<4}  {'KIND':<8} {'SIZE':>8}  DATA   (up = client->target)"


def _frame_lines(record: FrameRecord, view: PayloadView) -> Iterator[str]:
    kind = record.kind.name.lower() + ("" if record.fin else "+")
    head = (
        f"{record.time_us / 1e6:12.6f}  {DIRECTION_LABEL[record.direction]:<4}  "
        f"{kind:<8} {len(record.payload):>8}"
    )
    payload = record.payload
    if record.kind is Kind.CLOSE:
        code, reason = record.close_code_reason()
        yield f"{head}  {code if code is not None else '(no code)'} {reason!r}"
        return
    if view is PayloadView.NONE or not payload:
        yield head
        return
    text = record.kind is Kind.TEXT
    if view is PayloadView.PREVIEW:
        yield f"{head}  {one_line(payload, text=text)}"
        return
    yield head
    if text or looks_like_text(payload):
        for line in payload.decode("utf-8", "replace").splitlines() or [""]:
            for start in range(0, max(len(line), 1), TEXT_WIDTH):
                yield f"{'':14}| {line[start : start + TEXT_WIDTH]}"
    else:
        yield from hexdump(payload, 0, " " * 14)


def _other_lines(record: GapRecord | EndRecord) -> Iterator[str]:
    time = f"{record.time_us / 1e6:12.6f}  ----"
    if isinstance(record, GapRecord):
        yield (
            f"{time}  GAP      not recorded: {record.frames_up} frames ({record.bytes_up} B) up, "
            f"{record.frames_down} frames ({record.bytes_down} B) down, until "
            f"{record.until_us / 1e6:.6f} s: {record.reason}"
        )
    else:
        code = record.close_code if record.close_code is not None else "none"
        yield (
            f"{time}  END      close {code} by {record.closed_by} "
            f"({record.close_reason or 'no reason'})"
        )


def print_timeline(
    reader: RecordingReader,
    out: TextIO,
    *,
    view: PayloadView = PayloadView.PREVIEW,
    only: Direction | None = None,
    on_progress: Callable[[int], None] | None = None,
    summary: Summary | None = None,
) -> ReadStatus:
    """Print header, timeline and summary; returns where and why reading stopped.
    ``summary``, when given, is filled (its ``gaps``, totals, close)."""
    for line in _header(reader):
        print(line, file=out)
    summary = summary if summary is not None else Summary()
    for record in reader:
        summary.add(record)
        if isinstance(record, FrameRecord):
            if only is None or record.direction is only:
                for line in _frame_lines(record, view):
                    print(line, file=out)
        else:
            for line in _other_lines(record):
                print(line, file=out)
        if on_progress is not None:
            on_progress(reader.position)
    assert reader.status is not None
    print(file=out)
    for line in summary.lines(reader.status):
        print(line, file=out)
    return reader.status
