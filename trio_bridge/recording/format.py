"""The session recording format, version 3: the specification in code.

docs/recording-format.md is the prose twin of this module; change both together.

A recording is a 12-byte prelude followed by records::

    prelude   8s  magic  b"\\x89TBR\\r\\n\\x1a\\n"   (PNG-style: catches text-mode mangling)
              u16 version (3), u16 reserved (0)          big-endian
    record    u32 header_crc   CRC-32 of the next 18 header bytes
              u32 length       payload length in bytes
              u32 payload_crc  CRC-32 of the payload
              u64 time_us      microseconds since the session started (monotonic clock)
              u8  kind         see :class:`Kind`
              u8  flags        FIN (0x01), DOWN (0x02: target->client; clear: client->target)
              payload          ``length`` bytes

Why this shape: every record can be checked on its own, so a file cut at any byte (a
killed process, a full disk, a reader racing the writer) reads up to its last complete
record; the header has its own checksum so a damaged length can never send a reader
off allocating or seeking into garbage, and the payload's checksum catches a payload
damaged in place (a bad sector, a torn write after a power loss). 22 bytes per record
is 0.03 % of a 64 KiB message. Records are appended in batches, never rewritten.

Versions 1 and 2 are still read. Version 1 is this layout under another number.
Version 2 had an 18-byte header without ``payload_crc``: it was written while bulk
target data was recorded with tee(2) and never entered the bridge's memory; recorded
sessions now relay through Python, and the checksum came back (computed in the
writer's thread, which zlib runs without the GIL).

The first record is always :attr:`Kind.META` (JSON), then frames in the order the
bridge saw them, :attr:`Kind.GAP` (JSON) wherever events could not be recorded, and
:attr:`Kind.END` (JSON) last when the session ended and the recorder could write it.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ..observe import Direction

MAGIC = b"\x89TBR\r\n\x1a\n"
VERSION = 3
FORMAT_NAME = "trio-bridge-recording"
FILE_SUFFIX = ".tbrec"

PRELUDE = struct.Struct(">8sHH")
_CRC = struct.Struct(">I")
_HEADER_REST = struct.Struct(">IIQBB")  # length, payload_crc, time_us, kind, flags
HEADER_SIZE = _CRC.size + _HEADER_REST.size  # 22
_V2_HEADER_REST = struct.Struct(">IQBB")  # length, time_us, kind, flags

FLAG_FIN = 0x01
FLAG_DOWN = 0x02
KNOWN_FLAGS = FLAG_FIN | FLAG_DOWN


class Kind(enum.IntEnum):
    """What a record holds. Values 0x0-0xF are the WebSocket opcodes of the frame."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA
    META = 0x80
    GAP = 0x81
    END = 0x82


FRAME_KINDS = frozenset({Kind.CONT, Kind.TEXT, Kind.BINARY, Kind.CLOSE, Kind.PING, Kind.PONG})
DATA_KINDS = frozenset({Kind.CONT, Kind.TEXT, Kind.BINARY})
#: Kinds a later minor revision may add; a version-1 reader skips them.
FIRST_EXTENSION_KIND = 0x83


class FormatError(Exception):
    """The bytes at ``offset`` are not what the format allows; the message says why."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset
        self.message = message


class RecordHeader(NamedTuple):
    length: int
    time_us: int
    kind: int
    flags: int
    payload_crc: int | None = None  # None in version 2


# -- encoding ---------------------------------------------------------------------------


def encode_prelude() -> bytes:
    return PRELUDE.pack(MAGIC, VERSION, 0)


def encode_header(kind: int, flags: int, time_us: int, payload: bytes) -> bytes:
    """The 22-byte header of a record whose ``payload`` follows it unchanged.

    Checksumming a large payload releases the GIL (zlib does for more than 5 KiB), so
    the writer's thread costs the relay little here."""
    rest = _HEADER_REST.pack(len(payload), zlib.crc32(payload), time_us, kind, flags)
    return _CRC.pack(zlib.crc32(rest)) + rest


def frame_flags(direction: Direction, fin: bool) -> int:
    return (FLAG_DOWN if direction is Direction.DOWN else 0) | (FLAG_FIN if fin else 0)


# -- decoding ---------------------------------------------------------------------------


def check_prelude(data: bytes) -> HeaderLayout:
    """Check the prelude; the record layout of the file's format version."""
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise FormatError(0, "not a trio-bridge recording (wrong magic bytes)")
    if not data:
        raise FormatError(0, "the file is empty (the recorder stopped before writing)")
    if len(data) < PRELUDE.size:
        raise FormatError(len(data), "the file ends inside the 12-byte prelude")
    _, version, _ = PRELUDE.unpack(data)
    if version not in LAYOUTS:  # the versions this reader knows; it writes VERSION
        *first, last = sorted(LAYOUTS)
        known = ", ".join(map(str, first)) + f" and {last}"
        raise FormatError(
            8,
            f"recording format version {version} is not supported (this reader knows "
            f"versions {known}); a newer trio-bridge-replay may read it",
        )
    return LAYOUTS[version]


class HeaderLayout:
    """How one format version lays out a record header (the rest of a record is alike)."""

    def __init__(self, version: int, rest: struct.Struct, has_payload_crc: bool) -> None:
        self.version = version
        self._rest = rest
        self.size = _CRC.size + rest.size
        self._has_payload_crc = has_payload_crc

    def decode(self, data: bytes, offset: int) -> RecordHeader:
        (crc,) = _CRC.unpack_from(data)
        rest = data[_CRC.size : self.size]
        if zlib.crc32(rest) != crc:
            raise FormatError(offset, "record header fails its checksum (damaged or not a record)")
        if self._has_payload_crc:
            length, payload_crc, time_us, kind, flags = self._rest.unpack(rest)
            header = RecordHeader(length, time_us, kind, flags, payload_crc)
        else:
            header = RecordHeader(*self._rest.unpack(rest))
        if header.flags & ~KNOWN_FLAGS:
            raise FormatError(offset, f"record has unknown flags 0x{header.flags:02x}")
        return header


LAYOUTS = {
    1: HeaderLayout(1, _HEADER_REST, has_payload_crc=True),
    2: HeaderLayout(2, _V2_HEADER_REST, has_payload_crc=False),
    3: HeaderLayout(3, _HEADER_REST, has_payload_crc=True),
}


def check_payload(header: RecordHeader, payload: bytes, offset: int) -> None:
    """Versions 1 and 3 carry a payload checksum; check it where there is one."""
    if header.payload_crc is not None and zlib.crc32(payload) != header.payload_crc:
        raise FormatError(offset, "record payload fails its checksum (damaged file)")


def _json_object(payload: bytes, what: str, offset: int) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(offset, f"{what} record is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(offset, f"{what} record is not a JSON object")
    return value


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """The session's identity and settings: the payload of the first record."""

    session_id: str
    client: str
    target: str
    path: str
    subprotocol: str | None
    started: float  # wall clock, seconds since the Unix epoch
    options: dict[str, Any] = field(default_factory=dict)
    writer: str = ""
    #: Fields this reader does not know (written by a later minor revision).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def started_utc(self) -> str:
        return datetime.fromtimestamp(self.started, UTC).isoformat(timespec="microseconds")

    def encode(self) -> bytes:
        return _json_bytes(
            {
                "format": FORMAT_NAME,
                "version": VERSION,
                "session_id": self.session_id,
                "client": self.client,
                "target": self.target,
                "path": self.path,
                "subprotocol": self.subprotocol,
                "started": self.started,
                "started_utc": self.started_utc,
                "options": self.options,
                "writer": self.writer,
                **self.extra,
            }
        )

    @classmethod
    def decode(cls, payload: bytes, offset: int) -> Meta:
        fields = _json_object(payload, "META", offset)
        if fields.pop("format", None) != FORMAT_NAME:
            raise FormatError(offset, "META record does not name the trio-bridge format")
        fields.pop("version", None)
        fields.pop("started_utc", None)
        try:
            return cls(
                session_id=str(fields.pop("session_id")),
                client=str(fields.pop("client")),
                target=str(fields.pop("target")),
                path=str(fields.pop("path", "/")),
                subprotocol=fields.pop("subprotocol", None),
                started=float(fields.pop("started")),
                options=dict(fields.pop("options", {})),
                writer=str(fields.pop("writer", "")),
                extra=fields,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(offset, f"META record lacks a valid field {exc}") from None


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One WebSocket frame as the bridge saw it; ``payload`` is exactly the frame's data
    (after permessage-deflate decoding, when that was negotiated)."""

    time_us: int
    direction: Direction
    kind: Kind
    fin: bool
    payload: bytes
    offset: int = -1

    @property
    def is_data(self) -> bool:
        return self.kind in DATA_KINDS

    def close_code_reason(self) -> tuple[int | None, str]:
        """Code and reason of a CLOSE frame (None for an empty close frame)."""
        if len(self.payload) < 2:
            return None, ""
        code = int.from_bytes(self.payload[:2], "big")
        return code, self.payload[2:].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class GapRecord:
    """Events that happened but are not in the file: a buffer overflow or a write error."""

    time_us: int  # when the first lost event happened
    until_us: int  # when the last lost event happened
    frames_up: int
    bytes_up: int
    frames_down: int
    bytes_down: int
    reason: str
    offset: int = -1

    @property
    def total_frames(self) -> int:
        return self.frames_up + self.frames_down

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def encode(self) -> bytes:
        return _json_bytes(
            {
                "until_us": self.until_us,
                "frames_up": self.frames_up,
                "bytes_up": self.bytes_up,
                "frames_down": self.frames_down,
                "bytes_down": self.bytes_down,
                "reason": self.reason,
            }
        )

    @classmethod
    def decode(cls, time_us: int, payload: bytes, offset: int) -> GapRecord:
        fields = _json_object(payload, "GAP", offset)
        try:
            return cls(
                time_us=time_us,
                until_us=int(fields.get("until_us", time_us)),
                frames_up=int(fields["frames_up"]),
                bytes_up=int(fields["bytes_up"]),
                frames_down=int(fields["frames_down"]),
                bytes_down=int(fields["bytes_down"]),
                reason=str(fields.get("reason", "")),
                offset=offset,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(offset, f"GAP record lacks a valid field {exc}") from None


@dataclass(frozen=True, slots=True)
class EndRecord:
    """How the session ended, as the bridge's end-of-session log line says it."""

    time_us: int
    close_code: int | None
    close_reason: str
    closed_by: str
    offset: int = -1

    def encode(self) -> bytes:
        return _json_bytes(
            {
                "close_code": self.close_code,
                "close_reason": self.close_reason,
                "closed_by": self.closed_by,
            }
        )

    @classmethod
    def decode(cls, time_us: int, payload: bytes, offset: int) -> EndRecord:
        fields = _json_object(payload, "END", offset)
        code = fields.get("close_code")
        return cls(
            time_us=time_us,
            close_code=int(code) if isinstance(code, int) else None,
            close_reason=str(fields.get("close_reason", "")),
            closed_by=str(fields.get("closed_by", "")),
            offset=offset,
        )


Record = FrameRecord | GapRecord | EndRecord
