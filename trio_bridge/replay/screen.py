"""Screens for the ``rfb`` comparator: a framebuffer in the session's pixel format, the
regions where two differ, and PNG images of them (zlib only, no imaging library)."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TILE = 16  # the grid on which differing pixels are grouped into regions


@dataclass(frozen=True)
class PixelFormat:
    bits: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    maxima: tuple[int, int, int] = (255, 255, 255)
    shifts: tuple[int, int, int] = (16, 8, 0)

    @classmethod
    def parse(cls, data: bytes) -> PixelFormat:
        bits, depth, big, true, rm, gm, bm, rs, gs, bs = struct.unpack(">BBBBHHHBBB3x", data)
        return cls(bits, depth, bool(big), bool(true), (rm, gm, bm), (rs, gs, bs))

    @property
    def size(self) -> int:
        return max(self.bits // 8, 1)

    def rgb(self, pixel: bytes, colours: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
        value = int.from_bytes(pixel, "big" if self.big_endian else "little")
        if not self.true_colour:
            return colours.get(value, (value, value, value))
        return (
            _channel(value, self.shifts[0], self.maxima[0]),
            _channel(value, self.shifts[1], self.maxima[1]),
            _channel(value, self.shifts[2], self.maxima[2]),
        )


def _channel(value: int, shift: int, maximum: int) -> int:
    return ((value >> shift) & maximum) * 255 // maximum if maximum else 0


class Screen:
    """A framebuffer: ``width`` x ``height`` pixels of ``pixel_format.size`` bytes, and
    which pixels are *unknown*: painted by something not decoded (a JPEG), so not to be
    compared until painted again."""

    def __init__(self, width: int, height: int, pixel_format: PixelFormat) -> None:
        self.resize(width, height, pixel_format)
        self.colours: dict[int, tuple[int, int, int]] = {}

    def resize(self, width: int, height: int, pixel_format: PixelFormat) -> None:
        self.width, self.height, self.format = width, height, pixel_format
        self.pixels = bytearray(width * height * pixel_format.size)
        self.unknown = bytearray(width * height)  # 1: not known
        self.unknown_pixels = 0  # how many pixels have ever been marked unknown

    def _known(self, x: int, y: int, w: int, h: int, value: int = 0) -> None:
        x2, y2 = min(x + w, self.width), min(y + h, self.height)
        if x < x2:
            for row in range(y, y2):
                start = row * self.width + x
                self.unknown[start : start + x2 - x] = bytes([value]) * (x2 - x)

    def mark_unknown(self, x: int, y: int, w: int, h: int) -> None:
        self._known(x, y, w, h, 1)
        self.unknown_pixels += max(min(x + w, self.width) - x, 0) * max(
            min(y + h, self.height) - y, 0
        )

    def masked(self, mask: Screen) -> Screen:
        """A copy with the pixels unknown in ``mask`` (same size) zeroed."""
        copy = Screen(self.width, self.height, self.format)
        copy.colours = self.colours
        size = self.format.size
        keep = bytes(mask.unknown).replace(b"\0", b"\xff" * size).replace(b"\x01", b"\0" * size)
        value = int.from_bytes(self.pixels, "big") & int.from_bytes(keep, "big")
        copy.pixels[:] = value.to_bytes(len(self.pixels), "big")
        return copy

    def _rows(self, x: int, y: int, w: int, h: int) -> Iterator[tuple[int, int]]:
        """(start, end) in ``pixels`` of each row of the rectangle, clipped to the screen."""
        size = self.format.size
        x2, y2 = min(x + w, self.width), min(y + h, self.height)
        if x >= x2:
            return
        for row in range(y, y2):
            start = (row * self.width + x) * size
            yield start, start + (x2 - x) * size

    def fill(self, x: int, y: int, w: int, h: int, pixel: bytes) -> None:
        self._known(x, y, w, h)
        for start, end in self._rows(x, y, w, h):
            self.pixels[start:end] = pixel * ((end - start) // len(pixel))

    def put(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
        """Raw pixels, row by row (``w`` pixels each), clipped to the screen."""
        self._known(x, y, w, h)
        stride = w * self.format.size
        for i, (start, end) in enumerate(self._rows(x, y, w, h)):
            self.pixels[start:end] = data[i * stride : i * stride + end - start]

    def copy(self, source_x: int, source_y: int, x: int, y: int, w: int, h: int) -> None:
        rows = [bytes(self.pixels[s:e]) for s, e in self._rows(source_x, source_y, w, h)]
        for (start, end), row in zip(self._rows(x, y, w, h), rows, strict=False):
            self.pixels[start:end] = row[: end - start]
        size = self.format.size
        unknown = [
            bytes(self.unknown[s // size : e // size])
            for s, e in self._rows(source_x, source_y, w, h)
        ]
        for (start, end), row in zip(self._rows(x, y, w, h), unknown, strict=False):
            self.unknown[start // size : end // size] = row[: (end - start) // size]

    def pixel(self, x: int, y: int) -> bytes:
        size = self.format.size
        start = (y * self.width + x) * size
        return bytes(self.pixels[start : start + size])

    def rgb_rows(self) -> Iterator[bytes]:
        """The screen as 8-bit RGB, row by row (for images)."""
        size, cache = self.format.size, dict[bytes, bytes]()
        for y in range(self.height):
            row = self.pixels[y * self.width * size : (y + 1) * self.width * size]
            out = bytearray()
            for i in range(0, len(row), size):
                pixel = bytes(row[i : i + size])
                if (rgb := cache.get(pixel)) is None:
                    rgb = cache[pixel] = bytes(self.format.rgb(pixel, self.colours))
                out += rgb
            yield bytes(out)


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    width: int
    height: int
    pixels: int  # how many differ
    expected: tuple[int, int, int]  # the most common colour there, each side
    got: tuple[int, int, int]

    def describe(self) -> str:
        return (
            f"region x={self.x} y={self.y} {self.width}x{self.height}: {self.pixels} pixels "
            f"differ; expected mostly {_rgb(self.expected)}, got mostly {_rgb(self.got)}"
        )


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({},{},{}) #{:02x}{:02x}{:02x}".format(*colour, *colour)


def differing_regions(expected: Screen, got: Screen) -> list[Region]:
    """The regions where two screens of one size and format differ: differing 16x16
    tiles, grouped into connected areas, each reported by its bounding box."""
    tiles = _differing_tiles(expected, got)
    regions = []
    while tiles:
        group = _connected(tiles)
        tiles -= group
        regions.append(_region(expected, got, group))
    regions.sort(key=lambda r: (-r.pixels, r.y, r.x))
    return regions


def _differing_tiles(expected: Screen, got: Screen) -> set[tuple[int, int]]:
    size, width = expected.format.size, expected.width
    tiles: set[tuple[int, int]] = set()
    row_bytes = width * size
    for y in range(expected.height):
        start = y * row_bytes
        a = expected.pixels[start : start + row_bytes]
        b = got.pixels[start : start + row_bytes]
        if a == b:
            continue
        step = TILE * size
        for column in range(0, row_bytes, step):
            if a[column : column + step] != b[column : column + step]:
                tiles.add((column // step, y // TILE))
    return tiles


def _connected(tiles: set[tuple[int, int]]) -> set[tuple[int, int]]:
    start = min(tiles, key=lambda t: (t[1], t[0]))
    group, todo = {start}, [start]
    while todo:
        tx, ty = todo.pop()
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                neighbour = (tx + dx, ty + dy)
                if neighbour in tiles and neighbour not in group:
                    group.add(neighbour)
                    todo.append(neighbour)
    return group


def _region(expected: Screen, got: Screen, group: set[tuple[int, int]]) -> Region:
    """The exact bounding box and counts of the differing pixels in ``group``'s tiles."""
    ours: Counter[bytes] = Counter()
    theirs: Counter[bytes] = Counter()
    left, top, right, bottom = expected.width, expected.height, -1, -1
    for tx, ty in group:
        for y in range(ty * TILE, min((ty + 1) * TILE, expected.height)):
            for x in range(tx * TILE, min((tx + 1) * TILE, expected.width)):
                a, b = expected.pixel(x, y), got.pixel(x, y)
                if a != b:
                    ours[a] += 1
                    theirs[b] += 1
                    left, top = min(left, x), min(top, y)
                    right, bottom = max(right, x), max(bottom, y)
    rgb = expected.format.rgb
    return Region(
        left,
        top,
        right - left + 1,
        bottom - top + 1,
        sum(ours.values()),
        rgb(ours.most_common(1)[0][0], expected.colours),
        rgb(theirs.most_common(1)[0][0], got.colours),
    )


def write_png(path: Path, width: int, height: int, rows: Iterator[bytes]) -> None:
    """An 8-bit RGB PNG (no filter): enough for a screen, with zlib and no dependency."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\0" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def diff_rows(expected: Screen, got: Screen) -> Iterator[bytes]:
    """The expected screen, dimmed, with the differing pixels in red."""
    size = expected.format.size
    for y, row in enumerate(expected.rgb_rows()):
        out = bytearray(channel // 3 for channel in row)
        start = y * expected.width * size
        a = expected.pixels[start : start + expected.width * size]
        b = got.pixels[start : start + expected.width * size]
        if a != b:
            for x in range(expected.width):
                if a[x * size : (x + 1) * size] != b[x * size : (x + 1) * size]:
                    out[3 * x : 3 * x + 3] = b"\xff\x00\x00"
        yield bytes(out)
