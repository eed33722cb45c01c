"""The RFB encodings the ``rfb`` comparator decodes beyond Raw and CopyRect: RRE and
Hextile (RFC 6143 7.7), and Tight (the community RFB specification), which x11vnc sends
to noVNC. Each decoder paints one rectangle on a :class:`Screen` and returns the bytes
its body used, or raises :class:`NeedMore` (nothing painted, nothing consumed) when the
body is not all there yet."""

from __future__ import annotations

import struct
import zlib

from .screen import PixelFormat, Screen

TILE = 16  # Hextile's tiles


class Undecodable(Exception):
    """An encoding variant this module does not decode; the message says which."""


class NeedMore(Exception):
    """The buffer ends inside what is being parsed: retry when more has arrived."""


def need(buffer: bytes | bytearray | memoryview, count: int) -> int:
    if len(buffer) < count:
        raise NeedMore
    return count


def decode_rre(screen: Screen, x: int, y: int, w: int, h: int, body: memoryview) -> int:
    size = screen.format.size
    need(body, 4 + size)
    count = int(struct.unpack_from(">I", body)[0])
    used = 4 + size + count * (size + 8)
    need(body, used)
    screen.fill(x, y, w, h, bytes(body[4 : 4 + size]))
    position = 4 + size
    for _ in range(count):
        pixel = bytes(body[position : position + size])
        sx, sy, sw, sh = struct.unpack_from(">HHHH", body, position + size)
        screen.fill(x + sx, y + sy, sw, sh, pixel)
        position += size + 8
    return used


def decode_hextile(screen: Screen, x: int, y: int, w: int, h: int, body: memoryview) -> int:
    """RFC 6143 7.7.4: 16x16 tiles, each raw or a background with subrectangles. The
    whole rectangle is checked present before anything is painted (atomic retry)."""
    size = screen.format.size
    tiles = [
        (tx, ty, min(TILE, x + w - tx), min(TILE, y + h - ty))
        for ty in range(y, y + h, TILE)
        for tx in range(x, x + w, TILE)
    ]
    paints: list[tuple[str, int, int, int, int, bytes]] = []
    position, background, foreground = 0, b"\0" * size, b"\0" * size
    for tx, ty, tw, th in tiles:
        need(body, position + 1)
        flags = body[position]
        position += 1
        if flags & 1:  # Raw
            need(body, position + tw * th * size)
            end = position + tw * th * size
            paints.append(("put", tx, ty, tw, th, bytes(body[position:end])))
            position = end
            continue
        if flags & 2:
            need(body, position + size)
            background = bytes(body[position : position + size])
            position += size
        paints.append(("fill", tx, ty, tw, th, background))
        if flags & 4:
            need(body, position + size)
            foreground = bytes(body[position : position + size])
            position += size
        if not flags & 8:
            continue
        need(body, position + 1)
        count = body[position]
        position += 1
        coloured = bool(flags & 16)
        for _ in range(count):
            colour = foreground
            if coloured:
                need(body, position + size)
                colour = bytes(body[position : position + size])
                position += size
            need(body, position + 2)
            xy, wh = body[position], body[position + 1]
            position += 2
            sub = (tx + (xy >> 4), ty + (xy & 15), (wh >> 4) + 1, (wh & 15) + 1)
            paints.append(("fill", *sub, colour))
    for how, px, py, pw, ph, data in paints:
        (screen.put if how == "put" else screen.fill)(px, py, pw, ph, data)
    return position


class TightDecoder:
    """The Tight encoding (the RFB community spec; what x11vnc sends noVNC): fill, and
    basic compression with the copy and palette filters, through four zlib streams kept
    per connection. JPEG and the gradient filter (which noVNC does not decode either)
    stop the decoding. Nothing is consumed until a rectangle is complete, so a zlib
    stream sees each block once."""

    def __init__(self) -> None:
        self.streams = [zlib.decompressobj() for _ in range(4)]

    def decode(self, screen: Screen, x: int, y: int, w: int, h: int, body: memoryview) -> int:
        need(body, 1)
        control = body[0]
        kind = control >> 4
        pixel_size = 3 if _tight_rgb(screen.format) else screen.format.size
        if kind == 8:  # fill
            used = need(body, 1 + pixel_size)
            self._reset(control)
            screen.fill(x, y, w, h, self._pixel(screen, bytes(body[1:used])))
            return used
        if kind in (9, 10):  # JPEG (lossy) or PNG: skipped, the area marked unknown
            length, position = _compact_length(body, 1)
            end = need(body, position + length)
            self._reset(control)
            screen.mark_unknown(x, y, w, h)
            return end
        if kind & 8:
            raise Undecodable(f"Tight compression {kind} is not known")
        position, filter_id = 1, 0
        if control & 0x40:
            need(body, 2)
            filter_id, position = body[1], 2
        palette: list[bytes] = []
        if filter_id == 1:
            need(body, position + 1)
            count = body[position] + 1
            end = need(body, position + 1 + count * pixel_size)
            palette = [
                self._pixel(screen, bytes(body[i : i + pixel_size]))
                for i in range(position + 1, end, pixel_size)
            ]
            position = end
        elif filter_id != 0:
            raise Undecodable("the Tight gradient filter is not decoded")
        bits = 1 if 0 < len(palette) <= 2 else 8
        size = ((w * bits + 7) // 8) * h if palette else w * h * pixel_size
        data, position = self._data(body, position, size, (control >> 4) & 3, control)
        if palette:
            screen.put(x, y, w, h, _unpalette(data, palette, w, h, bits))
        else:
            pixels = [data[i : i + pixel_size] for i in range(0, len(data), pixel_size)]
            screen.put(x, y, w, h, b"".join(self._pixel(screen, p) for p in pixels))
        return position

    def _data(
        self, body: memoryview, position: int, size: int, stream: int, control: int
    ) -> tuple[bytes, int]:
        """The rectangle's pixel data: raw when under 12 bytes, else zlib (compact length)."""
        if size < 12:
            end = need(body, position + size)
            self._reset(control)
            return bytes(body[position:end]), end
        length, position = _compact_length(body, position)
        end = need(body, position + length)
        self._reset(control)
        data = self.streams[stream].decompress(bytes(body[position:end]))
        return data, end

    def _reset(self, control: int) -> None:
        for i in range(4):
            if control >> i & 1:
                self.streams[i] = zlib.decompressobj()

    @staticmethod
    def _pixel(screen: Screen, value: bytes) -> bytes:
        """A TPIXEL (R, G, B bytes when the format allows) as a pixel of the screen."""
        pf = screen.format
        if not _tight_rgb(pf):
            return value
        r, g, b = value
        number = r << pf.shifts[0] | g << pf.shifts[1] | b << pf.shifts[2]
        return number.to_bytes(pf.size, "big" if pf.big_endian else "little")


def _tight_rgb(pf: PixelFormat) -> bool:
    return pf.true_colour and pf.bits == 32 and pf.depth == 24 and pf.maxima == (255, 255, 255)


def _compact_length(body: memoryview, position: int) -> tuple[int, int]:
    length = 0
    for i in range(3):
        need(body, position + i + 1)
        byte = body[position + i]
        length |= (byte & (0x7F if i < 2 else 0xFF)) << (7 * i)
        if i == 2 or not byte & 0x80:
            return length, position + i + 1
    raise AssertionError("unreachable")


def _unpalette(data: bytes, palette: list[bytes], w: int, h: int, bits: int) -> bytes:
    out = bytearray()
    if bits == 8:
        for index in data[: w * h]:
            out += palette[index] if index < len(palette) else palette[0]
        return bytes(out)
    row_bytes = (w + 7) // 8
    for row in range(h):
        for column in range(w):
            bit = data[row * row_bytes + column // 8] >> (7 - column % 8) & 1
            out += palette[bit] if bit < len(palette) else palette[0]
    return bytes(out)
