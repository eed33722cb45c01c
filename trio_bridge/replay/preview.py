"""How payloads are shown to a person: one-line previews and hexdumps.

Shared by the timeline, ``serve``'s client report and ``drive``'s diff so that the same
bytes always look the same.
"""

from __future__ import annotations

from collections.abc import Iterator

_PRINTABLE = bytes(range(0x20, 0x7F))
_ASCII_TABLE = bytes(b if b in _PRINTABLE else ord(".") for b in range(256))


def ascii_column(data: bytes) -> str:
    return data.translate(_ASCII_TABLE).decode("ascii")


def hex_bytes(data: bytes) -> str:
    return data.hex(" ")


def looks_like_text(data: bytes) -> bool:
    """Printable UTF-8 (tabs and newlines allowed): shown as text rather than hex."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def one_line(data: bytes, *, text: bool = False, limit: int = 32) -> str:
    """A short preview: quoted text for text frames and printable data, else hex + ASCII
    (of at most 16 bytes, so that a line stays readable)."""
    if text or looks_like_text(data):
        more = "..." if len(data) > limit else ""
        quoted = repr(data[:limit].decode("utf-8", "replace"))
        return quoted[:-1] + more + quoted[-1]
    head = data[: min(limit, 16)]
    more = " ..." if len(data) > len(head) else ""
    return f"{hex_bytes(head)}{more}  |{ascii_column(head)}|"


def hexdump(data: bytes, start: int = 0, prefix: str = "") -> Iterator[str]:
    """``xxd``-style lines: offset, 16 hex bytes in two groups of 8, ASCII."""
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        left, right = hex_bytes(row[:8]), hex_bytes(row[8:])
        yield f"{prefix}{start + i:08x}  {left:<23}  {right:<23}  |{ascii_column(row)}|"


def describe_payload(data: bytes, *, text: bool = False, limit: int = 24) -> str:
    kind = "text" if text else "binary"
    return f"{kind} {len(data)} B {one_line(data, text=text, limit=limit)}"
