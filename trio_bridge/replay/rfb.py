"""The ``rfb`` comparator: compares what a VNC session's screen shows, not its bytes.

Two VNC servers showing the same picture send different bytes: they choose other
encodings, cut the screen into other rectangles, send a change in one update or two.
This comparator follows the RFB protocol (RFC 6143) on both sides, the recorded one and
the live one:

- the phases: ProtocolVersion, security (None and VNC authentication; the recorded
  response is replayed), ClientInit/ServerInit, then client and server messages;
- a framebuffer per side, painted by the server's FramebufferUpdates. The recorded side
  is decoded from the encodings the recorded server chose among Raw, CopyRect, RRE,
  Hextile and Tight (not its JPEG); the live side is asked for Raw and CopyRect only:
  the recorded client's SetEncodings is rewritten before it is sent (pseudo-encodings
  this module can skip, such as the cursor shape, are kept: without them the server
  would draw the cursor into the screen);
- at each sync point (the live server has caught up with the recording before a client
  message is sent, and at the end) the two screens are compared, and each region that
  differs is reported once, with the colours seen there on each side. ``images``: a
  folder where expected / actual / diff PNG images are written.

Pacing: the live side has caught up when it is not in the middle of a message and has
reached the recorded side's phase and as many FramebufferUpdates, or has answered every
update request sent to it (an update that only announces the size or name answers none).
A screen difference is reported when it is there at the end, or at two sync points in a
row.

A recorded encoding or message this module cannot decode stops the screen comparison
at that point (said in the report); the phases before it are still compared.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from .compare import Finding
from .messages import Message
from .rfb_encodings import (
    NeedMore,
    TightDecoder,
    Undecodable,
    decode_hextile,
    decode_rre,
    need,
)
from .screen import PixelFormat, Screen, diff_rows, differing_regions, write_png

RAW, COPY_RECT, RRE, HEXTILE, TIGHT = 0, 1, 2, 5, 7
DECODED = {RAW, COPY_RECT, RRE, HEXTILE, TIGHT}
LIVE_ENCODINGS = (RAW, COPY_RECT)  # asked of the live server: the simplest to decode
CURSOR, X_CURSOR, DESKTOP_SIZE, LAST_RECT, POINTER_POS, EXT_DESKTOP_SIZE, DESKTOP_NAME = (
    -239, -240, -223, -224, -232, -308, -307,
)  # fmt: skip
SKIPPED_PSEUDO = {
    CURSOR, X_CURSOR, DESKTOP_SIZE, LAST_RECT, POINTER_POS, EXT_DESKTOP_SIZE, DESKTOP_NAME,
}  # fmt: skip
# Sent by servers unasked (after SetEncodings): they answer no update request.
ANNOUNCEMENTS = {DESKTOP_SIZE, EXT_DESKTOP_SIZE, DESKTOP_NAME}
# Capabilities whose messages this module parses (QEMU keys, XVP, Fence, continuous
# updates, extended clipboard): kept in the live SetEncodings, the client may use them.
CAPABILITIES = {-258, -309, -312, -313, 0xC0A1E5CE - (1 << 32)}
# Quality and compression levels change no message's layout.
LEVELS = {*range(-32, -22), *range(-256, -246)}
MAX_REGIONS = 8


class Phase(IntEnum):
    VERSION = 0
    SECURITY = 1
    AUTH = 2
    INIT = 3
    NORMAL = 4


class RfbSide:
    """One side of an RFB session, from its two byte streams: where the protocol is, and
    the screen the client would show. ``stopped`` says why decoding stopped, if it did."""

    def __init__(self) -> None:
        self.phase = Phase.VERSION
        self.version = b""
        self.minor = 8
        self.security_types: tuple[int, ...] = ()
        self.security: int | None = None  # the type the client chose (or 3.3's server)
        self.security_result: int | None = None
        self.screen: Screen | None = None
        self.name = b""
        self.pixel_format = PixelFormat()
        self.updates = 0  # complete FramebufferUpdates
        self.full_updates = 0  # of which covered the whole screen
        self.requests = 0  # FramebufferUpdateRequests the client sent
        self.answers = 0  # updates that answer one: not a bare size or name announcement
        self.encodings_seen: set[int] = set()  # in the server's rectangles
        self.stopped = ""
        self._server = bytearray()
        self._challenged = False
        self._tight = TightDecoder()
        self._rects_left = 0
        self._announcement = False  # the update so far only announces size or name
        self._update_area = 0
        self._client = bytearray()
        self._client_phase = Phase.VERSION
        self._client_stopped = False

    @property
    def busy(self) -> bool:
        """In the middle of a server message."""
        return bool(self._rects_left or self._server)

    # -- the server's stream --------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        self._server += data
        self._parse_server()

    def _parse_server(self) -> None:
        while self._server and not self.stopped:
            try:
                used = self._server_step()
            except NeedMore:
                return
            if used is None:
                return  # waits for the client's side (its security choice)
            del self._server[:used]

    def _server_step(self) -> int | None:
        """Parse one unit at the start of the server buffer; the bytes it used."""
        buffer = self._server
        if self.phase is Phase.VERSION:
            need(buffer, 12)
            self.version = bytes(buffer[:12])
            digits = self.version[8:11]
            self.minor = min(int(digits), 8) if digits.isdigit() else 8
            self.phase = Phase.SECURITY
            return 12
        if self.phase is Phase.SECURITY:
            return self._security_types()
        if self.phase is Phase.AUTH:
            return self._authentication()
        if self.phase is Phase.INIT:
            return self._server_init()
        if self._rects_left:
            return self._rectangle()
        return self._server_message()

    def _security_types(self) -> int:
        buffer = self._server
        if self.minor < 7:  # 3.3: the server decides
            need(buffer, 4)
            (self.security,) = struct.unpack_from(">I", buffer)
            self.security_types = (self.security,)
            used = 4
        else:
            need(buffer, 1)
            count = buffer[0]
            need(buffer, 1 + count)
            self.security_types = tuple(buffer[1 : 1 + count])
            used = 1 + count
        if not self.security_types or self.security_types == (0,):
            self.stopped = "the server refused the connection (no security type)"
        self.phase = Phase.AUTH
        return used

    def _authentication(self) -> int | None:
        if self.security is None:
            return None
        buffer = self._server
        if self.security == 2:  # VNC authentication: a challenge, then the result
            if not self._challenged:
                need(buffer, 16)
                self._challenged = True
                return 16
        elif self.security != 1:
            self.stopped = f"security type {self.security} is not understood"
            return 0
        if self.security == 1 and self.minor < 8:
            self.phase = Phase.INIT  # 3.3 and 3.7 send no result for None
            return 0
        need(buffer, 4)
        (self.security_result,) = struct.unpack_from(">I", buffer)
        if self.security_result != 0:
            self.stopped = "the server refused the authentication"
        self.phase = Phase.INIT
        return 4

    def _server_init(self) -> int:
        buffer = self._server
        need(buffer, 24)
        width, height = struct.unpack_from(">HH", buffer)
        length = int(struct.unpack_from(">I", buffer, 20)[0])
        need(buffer, 24 + length)
        self.pixel_format = PixelFormat.parse(bytes(buffer[4:20]))
        self.name = bytes(buffer[24 : 24 + length])
        self.screen = Screen(width, height, self.pixel_format)
        self.phase = Phase.NORMAL
        return 24 + length

    def _server_message(self) -> int:
        buffer = self._server
        kind = buffer[0]
        if kind == 0:  # FramebufferUpdate
            need(buffer, 4)
            (self._rects_left,) = struct.unpack_from(">H", buffer, 2)
            self._update_area = 0
            self._announcement = bool(self._rects_left)
            if not self._rects_left:
                self._update_done()
            return 4
        if kind == 1:  # SetColourMapEntries
            need(buffer, 6)
            first, count = (int(v) for v in struct.unpack_from(">HH", buffer, 2))
            need(buffer, 6 + 6 * count)
            assert self.screen is not None
            for i in range(count):
                r, g, b = struct.unpack_from(">HHH", buffer, 6 + 6 * i)
                self.screen.colours[first + i] = (r >> 8, g >> 8, b >> 8)
            return 6 + 6 * count
        if kind == 2:  # Bell
            return 1
        if kind == 150:  # EndOfContinuousUpdates
            return 1
        if kind == 250:  # XVP
            return need(buffer, 4)
        if kind == 248:  # Fence
            need(buffer, 9)
            return need(buffer, 9 + buffer[8])
        if kind == 3:  # ServerCutText
            need(buffer, 8)
            length = int(struct.unpack_from(">i", buffer, 4)[0])
            need(buffer, 8 + abs(length))
            return 8 + abs(length)
        self.stopped = f"server message type {kind} is not understood"
        return 0

    def _update_done(self) -> None:
        self.updates += 1
        self.answers += not self._announcement
        screen = self.screen
        if screen is not None and self._update_area >= screen.width * screen.height:
            self.full_updates += 1

    def _rectangle(self) -> int:
        buffer, screen = self._server, self.screen
        assert screen is not None
        need(buffer, 12)
        x, y, w, h, encoding = struct.unpack_from(">HHHHi", buffer)
        self.encodings_seen.add(encoding)
        self._announcement &= encoding in ANNOUNCEMENTS
        body = memoryview(buffer)[12:]
        try:
            used = self._decode(encoding, x, y, w, h, body)
        except Undecodable as exc:
            self.stopped = f"{exc} (in an update at {x},{y} {w}x{h})"
            used = -1
        finally:
            body.release()
        if used < 0:
            return 0
        self._rects_left -= 1
        if encoding == LAST_RECT:
            self._rects_left = 0
        if encoding >= 0:
            self._update_area += w * h
        if not self._rects_left:
            self._update_done()
        return 12 + used

    def _decode(self, encoding: int, x: int, y: int, w: int, h: int, body: memoryview) -> int:
        """Paint one rectangle; the bytes of its body (-1: not decodable, ``stopped``)."""
        screen = self.screen
        assert screen is not None
        size = screen.format.size
        if encoding == RAW:
            need(body, w * h * size)
            screen.put(x, y, w, h, bytes(body[: w * h * size]))
            return w * h * size
        if encoding == COPY_RECT:
            need(body, 4)
            source_x, source_y = struct.unpack_from(">HH", body)
            screen.copy(source_x, source_y, x, y, w, h)
            return 4
        if encoding == RRE:
            return decode_rre(screen, x, y, w, h, body)
        if encoding == HEXTILE:
            return decode_hextile(screen, x, y, w, h, body)
        if encoding == TIGHT:
            return self._tight.decode(screen, x, y, w, h, body)
        if encoding in SKIPPED_PSEUDO:
            return _pseudo(screen, encoding, w, h, body)
        self.stopped = f"encoding {encoding} is not decoded (in an update at {x},{y} {w}x{h})"
        return -1

    # -- the client's stream --------------------------------------------------------------

    def from_client(self, data: bytes, rewrite: bool = False) -> bytes:
        """Follow what the client sent; returns it, with SetEncodings rewritten to the
        live encodings when ``rewrite``. What the parser does not understand passes
        unchanged (and ends the following)."""
        if self._client_stopped:
            return data
        self._client += data
        out = bytearray()
        while self._client and not self._client_stopped:
            try:
                used, replacement = self._client_step(rewrite)
            except NeedMore:
                break
            out += replacement if replacement is not None else self._client[:used]
            del self._client[:used]
        if self._client_stopped:
            out += self._client
            self._client.clear()
        self._parse_server()  # it may have waited for the client's choice
        return bytes(out)

    def _client_step(self, rewrite: bool) -> tuple[int, bytes | None]:
        buffer = self._client
        phase = self._client_phase
        if phase is Phase.VERSION:
            need(buffer, 12)
            version = bytes(buffer[8:11])
            minor = min(int(version), 8) if version.isdigit() else 8
            self.minor = min(self.minor, minor)
            self._client_phase = Phase.SECURITY if self.minor >= 7 else Phase.AUTH
            return 12, None
        if phase is Phase.SECURITY:
            self.security = buffer[0]
            self._client_phase = Phase.AUTH
            return 1, None
        if phase is Phase.AUTH:
            if self.security == 2:
                need(buffer, 16)
                self._client_phase = Phase.INIT
                return 16, None
            if self.security is None and self.minor < 7:
                raise NeedMore  # 3.3: the server has not said yet
            self._client_phase = Phase.INIT
            return 0, None
        if phase is Phase.INIT:
            self._client_phase = Phase.NORMAL
            return 1, None
        return self._client_message(rewrite)

    def _client_message(self, rewrite: bool) -> tuple[int, bytes | None]:
        buffer = self._client
        kind = buffer[0]
        sizes = {3: 10, 4: 8, 5: 6, 150: 10, 250: 4}
        if kind in sizes:
            need(buffer, sizes[kind])
            self.requests += kind == 3
            return sizes[kind], None
        if kind == 0:  # SetPixelFormat
            need(buffer, 20)
            self.pixel_format = PixelFormat.parse(bytes(buffer[4:20]))
            if self.screen is not None:
                self.screen.resize(self.screen.width, self.screen.height, self.pixel_format)
            return 20, None
        if kind == 2:  # SetEncodings
            need(buffer, 4)
            count = int(struct.unpack_from(">H", buffer, 2)[0])
            need(buffer, 4 + 4 * count)
            encodings = struct.unpack_from(f">{count}i", buffer, 4)
            return 4 + 4 * count, _set_encodings(encodings) if rewrite else None
        if kind == 6:  # ClientCutText
            need(buffer, 8)
            length = int(struct.unpack_from(">i", buffer, 4)[0])
            need(buffer, 8 + abs(length))
            return 8 + abs(length), None
        self._client_stopped = True
        return 0, None


def _pseudo(screen: Screen, encoding: int, w: int, h: int, body: memoryview) -> int:
    """A pseudo-rectangle: the size changes, the rest (cursor shapes, the desktop's
    name, markers) is skipped; the bytes of its body."""
    if encoding in (DESKTOP_SIZE, EXT_DESKTOP_SIZE):
        used = 0
        if encoding == EXT_DESKTOP_SIZE:
            need(body, 4)
            used = need(body, 4 + 16 * body[0])
        if (w, h) != (screen.width, screen.height):  # servers also announce the size
            screen.resize(w, h, screen.format)
        return used
    if encoding == CURSOR:
        return need(body, w * h * screen.format.size + (w + 7) // 8 * h)
    if encoding == X_CURSOR:
        return need(body, 6 + (w + 7) // 8 * h * 2) if w * h else 0
    if encoding == DESKTOP_NAME:
        need(body, 4)
        return need(body, 4 + int(struct.unpack_from(">I", body)[0]))
    return 0  # LastRect, PointerPos: no body


def _set_encodings(encodings: tuple[int, ...]) -> bytes:
    """The live SetEncodings: Raw and CopyRect, then the recorded pseudo-encodings this
    module can skip (cursor shape, desktop size, ...) and levels, in the recorded order."""
    kept = [e for e in encodings if e in SKIPPED_PSEUDO or e in LEVELS or e in CAPABILITIES]
    chosen = [*LIVE_ENCODINGS, *kept]
    return struct.pack(f">BxH{len(chosen)}i", 2, len(chosen), *chosen)


# -- the comparator ----------------------------------------------------------------------------


@dataclass
class RfbComparator:
    """The ``rfb`` comparator (the module doc says what it does)."""

    images: Path | None = None
    name: str = "rfb"
    recorded: RfbSide = field(default_factory=RfbSide)
    live: RfbSide = field(default_factory=RfbSide)
    found: list[Finding] = field(default_factory=list)
    syncs: int = 0
    _reported: set[object] = field(default_factory=set)
    _pending: object = None  # a screen difference seen at the last sync point
    notes: list[str] = field(default_factory=list)  # for the report, not differences
    _last_time_us: int = 0

    def client_sends(self, payload: bytes) -> bytes:
        self.recorded.from_client(payload)
        return self.live.from_client(payload, rewrite=True)

    def expect(self, message: Message) -> None:
        self._last_time_us = message.time_us
        self.recorded.from_server(message.payload)

    def receive(self, message: Message) -> None:
        self.live.from_server(message.payload)

    def caught_up(self) -> bool:
        live, recorded = self.live, self.recorded
        if live.stopped or recorded.stopped:
            return True  # nothing to follow further: the recorded timing paces
        if live.phase != recorded.phase:
            return live.phase > recorded.phase
        if live.phase is not Phase.NORMAL:
            return True
        if live.busy:
            return False  # in the middle of a message (a large update arrives in pieces)
        return live.updates >= recorded.updates or live.answers >= live.requests

    def sync(self, final: bool = False) -> None:
        """A sync point: compare the phases reached so far, and the screens."""
        self.syncs += 1
        self._compare_phases()
        self._compare_screens(final)

    def findings(self) -> list[Finding]:
        self.sync(final=True)
        if self.recorded.screen is not None and self.recorded.screen.unknown_pixels:
            self.notes.append(
                f"rfb: {self.recorded.screen.unknown_pixels} pixels of the recorded screen came "
                "as JPEG (lossy, not decoded) and were not compared until painted again"
            )
        for side, label in ((self.recorded, "recorded"), (self.live, "live")):
            if side.stopped:
                self._report(
                    ("stopped", label, side.stopped),
                    f"@@ rfb: the {label} session's screen is not followed further: "
                    f"{side.stopped} @@",
                )
        if self.recorded.updates and not self.live.updates:
            self._report("no updates", "@@ rfb: the live server sent no FramebufferUpdate @@")
        return self.found

    def _report(self, key: object, heading: str, *body: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.found.append(Finding(heading, body))

    def _compare_phases(self) -> None:
        recorded, live = self.recorded, self.live
        checks = [
            ("version", Phase.SECURITY, recorded.version, live.version),
            ("security types", Phase.AUTH, recorded.security_types, live.security_types),
            ("security result", Phase.INIT, recorded.security_result, live.security_result),
        ]
        for what, reached, ours, theirs in checks:
            if live.phase >= reached and recorded.phase >= reached and ours != theirs:
                self._report(what, f"@@ rfb {what}: recorded {ours!r}, got {theirs!r} @@")
        if recorded.screen is not None and live.screen is not None:
            a, b = recorded.screen, live.screen
            if (a.width, a.height) != (b.width, b.height):
                self._report(
                    ("size", a.width, a.height, b.width, b.height),
                    f"@@ rfb screen size: recorded {a.width}x{a.height}, "
                    f"got {b.width}x{b.height} @@",
                )

    def _compare_screens(self, final: bool) -> None:
        """A difference is reported when it is there at the end, or at two sync points in
        a row: a server may answer a request in two updates (say, the cursor shape, then
        the pixels), and a sync point can fall between them."""
        a, b = self.recorded.screen, self.live.screen
        if a is None or b is None or (self.recorded.stopped and self.syncs > 1):
            return
        if (a.width, a.height, a.format) != (b.width, b.height, b.format) or a.pixels == b.pixels:
            self._pending = None
            return
        if 1 in a.unknown:  # what the recording painted as JPEG is not compared
            a, b = a.masked(a), b.masked(a)
            if a.pixels == b.pixels:
                self._pending = None
                return
        regions = differing_regions(a, b)
        key = ("screen", tuple((r.x, r.y, r.width, r.height, r.expected, r.got) for r in regions))
        if key in self._reported:
            return
        if not final and key != self._pending:
            self._pending = key
            return
        body = [f"  {r.describe()}" for r in regions[:MAX_REGIONS]]
        if len(regions) > MAX_REGIONS:
            body.append(f"  ... and {len(regions) - MAX_REGIONS} more regions")
        if self.images is not None:
            body.append(f"  {self._write_images(a, b)}")
        self._report(
            key,
            f"@@ rfb screen at sync point {self.syncs} (after {self.recorded.updates} recorded "
            f"and {self.live.updates} live FramebufferUpdates, recording at "
            f"{self._last_time_us / 1e6:.3f} s): "
            f"{'1 region differs' if len(regions) == 1 else f'{len(regions)} regions differ'} @@",
            *body,
        )

    def _write_images(self, expected: Screen, got: Screen) -> str:
        assert self.images is not None
        self.images.mkdir(parents=True, exist_ok=True)
        stem = self.images / f"screen-{self.syncs}"
        names = []
        for suffix, rows in (
            ("expected", expected.rgb_rows()),
            ("actual", got.rgb_rows()),
            ("diff", diff_rows(expected, got)),
        ):
            path = stem.with_name(f"{stem.name}-{suffix}.png")
            write_png(path, expected.width, expected.height, rows)
            names.append(str(path))
        return "images: " + ", ".join(names)
