"""Reading recordings: one record at a time, so memory stays flat whatever the file size.

A file that was cut (a killed bridge, a full disk, a recording still being written)
reads up to its last complete record; :attr:`RecordingReader.status` then says where
reading stopped and why. Only a file that is not a recording at all (wrong magic,
unknown version, no readable META record) raises :class:`RecordingError`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..observe import Direction
from .format import (
    FIRST_EXTENSION_KIND,
    FLAG_DOWN,
    FLAG_FIN,
    FRAME_KINDS,
    PRELUDE,
    EndRecord,
    FormatError,
    FrameRecord,
    GapRecord,
    Kind,
    Meta,
    Record,
    RecordHeader,
    check_payload,
    check_prelude,
)

READ_BUFFER = 1 << 20


class RecordingError(Exception):
    """The file cannot be read as a recording; ``str()`` is one line naming file and offset."""

    def __init__(self, name: str, offset: int, message: str) -> None:
        super().__init__(f"{name}: offset {offset}: {message}")
        self.name = name
        self.offset = offset
        self.message = message


class Outcome(enum.Enum):
    COMPLETE = "complete"  # ends with the END record
    UNFINISHED = "unfinished"  # ends at a record boundary before any END record
    TRUNCATED = "truncated"  # ends inside a record
    CORRUPT = "corrupt"  # a record fails its checks


@dataclass(frozen=True)
class ReadStatus:
    """Where reading stopped (the end of the last good record) and why."""

    outcome: Outcome
    offset: int
    detail: str

    @property
    def complete(self) -> bool:
        return self.outcome is Outcome.COMPLETE

    def describe(self) -> str:
        return f"{self.outcome.value} at offset {self.offset}: {self.detail}"


class _Stop(Exception):
    def __init__(self, outcome: Outcome, offset: int, detail: str) -> None:
        self.status = ReadStatus(outcome, offset, detail)


class RecordingReader:
    """Reads one recording from a binary stream; iterate it once for the records.

    The prelude and META record are read on construction (``meta``); everything after
    is read lazily by iteration, and ``status`` is set when iteration ends.
    """

    def __init__(self, stream: BinaryIO, name: str = "recording") -> None:
        self._stream = stream
        self.name = name
        self.position = 0
        self.status: ReadStatus | None = None
        self._iterated = False
        prelude = self._read(PRELUDE.size)
        try:
            self.layout = check_prelude(prelude)
        except FormatError as exc:
            raise RecordingError(name, exc.offset, exc.message) from None
        self.position = PRELUDE.size
        try:
            header, payload = self._next_raw()
        except _Stop as stop:
            raise RecordingError(name, stop.status.offset, _no_meta(stop.status)) from None
        if header is None:
            raise RecordingError(name, self.position, "the file ends before the META record")
        if header.kind != Kind.META:
            raise RecordingError(name, PRELUDE.size, "the first record is not a META record")
        try:
            self.meta = Meta.decode(payload, PRELUDE.size)
        except FormatError as exc:
            raise RecordingError(name, exc.offset, exc.message) from None

    def __iter__(self) -> Iterator[Record]:
        if self._iterated:
            raise RuntimeError("a RecordingReader can be iterated only once")
        self._iterated = True
        ended_at: int | None = None
        try:
            while True:
                offset = self.position
                header, payload = self._next_raw()
                if header is None:
                    if ended_at is not None:
                        raise _Stop(Outcome.COMPLETE, offset, "the session's END record")
                    raise _Stop(
                        Outcome.UNFINISHED,
                        offset,
                        "no END record (the session was still running, or the recorder "
                        "was stopped or could not write it)",
                    )
                if ended_at is not None:
                    detail = f"a record after the END record at offset {ended_at}"
                    raise _Stop(Outcome.CORRUPT, offset, detail)
                record = self._decode(header, payload, offset)
                if record is None:
                    continue
                if isinstance(record, EndRecord):
                    ended_at = offset
                yield record
        except _Stop as stop:
            self.status = stop.status

    # -- internals ------------------------------------------------------------------------

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) == size or not data:
            return data
        chunks = [data]
        got = len(data)
        while got < size:
            more = self._stream.read(size - got)
            if not more:
                break
            chunks.append(more)
            got += len(more)
        return b"".join(chunks)

    def _next_raw(self) -> tuple[RecordHeader | None, bytes]:
        """The next record's header and checked payload, or (None, b"") at a clean end."""
        offset = self.position
        size = self.layout.size
        raw = self._read(size)
        if not raw:
            return None, b""
        if len(raw) < size:
            raise _Stop(
                Outcome.TRUNCATED,
                offset,
                f"the file ends inside a record header ({len(raw)} of {size} bytes)",
            )
        try:
            header = self.layout.decode(raw, offset)
        except FormatError as exc:
            raise _Stop(Outcome.CORRUPT, offset, exc.message) from None
        payload = self._read(header.length)
        if len(payload) < header.length:
            raise _Stop(
                Outcome.TRUNCATED,
                offset,
                f"the file ends inside a record ({len(payload)} of {header.length} "
                "payload bytes present)",
            )
        try:
            check_payload(header, payload, offset)
        except FormatError as exc:
            raise _Stop(Outcome.CORRUPT, offset, exc.message) from None
        self.position = offset + size + header.length
        return header, payload

    def _decode(self, header: RecordHeader, payload: bytes, offset: int) -> Record | None:
        kind = header.kind
        try:
            if kind in FRAME_KINDS:
                return FrameRecord(
                    time_us=header.time_us,
                    direction=Direction.DOWN if header.flags & FLAG_DOWN else Direction.UP,
                    kind=Kind(kind),
                    fin=bool(header.flags & FLAG_FIN),
                    payload=payload,
                    offset=offset,
                )
            if kind == Kind.GAP:
                return GapRecord.decode(header.time_us, payload, offset)
            if kind == Kind.END:
                return EndRecord.decode(header.time_us, payload, offset)
        except FormatError as exc:
            raise _Stop(Outcome.CORRUPT, offset, exc.message) from None
        if kind >= FIRST_EXTENSION_KIND:
            return None  # added by a later minor revision: skip, as the format says
        what = "a second META record" if kind == Kind.META else f"unknown record kind 0x{kind:02x}"
        raise _Stop(Outcome.CORRUPT, offset, what)


def _no_meta(status: ReadStatus) -> str:
    return f"cannot read the META record: {status.detail}"


@contextmanager
def open_recording(path: str | Path) -> Iterator[RecordingReader]:
    """``with open_recording(path) as reader:`` — a reader over a file on disk.

    Raises :class:`RecordingError` for a file that is not a readable recording, and
    ``OSError`` when it cannot be opened.
    """
    with open(path, "rb", buffering=READ_BUFFER) as stream:
        yield RecordingReader(stream, str(path))


@dataclass(frozen=True)
class LoadedRecording:
    meta: Meta
    records: list[Record]
    status: ReadStatus

    def frames(self, direction: Direction | None = None) -> list[FrameRecord]:
        return [
            r
            for r in self.records
            if isinstance(r, FrameRecord) and (direction is None or r.direction is direction)
        ]

    @property
    def gaps(self) -> list[GapRecord]:
        return [r for r in self.records if isinstance(r, GapRecord)]

    @property
    def end(self) -> EndRecord | None:
        last = self.records[-1] if self.records else None
        return last if isinstance(last, EndRecord) else None


def load_recording(path: str | Path) -> LoadedRecording:
    """Every record of a (small) recording in memory: for tests and short scripts."""
    with open_recording(path) as reader:
        records = list(reader)
    assert reader.status is not None
    return LoadedRecording(reader.meta, records, reader.status)
