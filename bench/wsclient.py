"""The one WebSocket client both proxies face: websockets' handshake, then raw sockets.

At a gigabyte per second the client shares the second core with the target, so it
must cost far less than the proxy it measures. The opening handshake therefore uses
websockets' sans-I/O :class:`~websockets.client.ClientProtocol` (strict and correct),
and the data path is as thin as the protocol allows:

- outgoing frames are serialised and masked by websockets once, ahead of time, and
  then sent over and over (the proxy unmasks every frame all the same);
- incoming frames (never masked, RFC 6455 5.1) are parsed by :class:`FrameReader`;
  for bulk data it reads only the few bytes of each header and discards payloads with
  ``recv(MSG_TRUNC)``, which TCP honours without copying them to user space.
"""

from __future__ import annotations

import socket
import struct

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

OP_CLOSE = Opcode.CLOSE.value
CONTROL_OPCODES = {Opcode.CLOSE.value, Opcode.PING.value, Opcode.PONG.value}
LENGTH16 = struct.Struct("!H")
LENGTH64 = struct.Struct("!Q")


class SessionFailed(Exception):
    """The handshake was refused or the proxy closed the session; the message says how."""


class Handshake:
    """The client's opening handshake, with the I/O left to the caller (blocking or Trio)."""

    def __init__(self, port: int) -> None:
        uri = parse_uri(f"ws://127.0.0.1:{port}/")
        self.protocol = ClientProtocol(uri, subprotocols=[Subprotocol("binary")])
        self.protocol.send_request(self.protocol.connect())

    def request(self) -> bytes:
        return b"".join(self.protocol.data_to_send())

    def feed(self, data: bytes) -> bool:
        """Take bytes from the proxy; True once the session is open."""
        if not data:
            raise SessionFailed("connection closed during the handshake")
        self.protocol.receive_data(data)
        events = self.protocol.events_received()
        if self.protocol.handshake_exc is not None:
            raise SessionFailed(f"handshake failed: {self.protocol.handshake_exc}")
        if not events:
            return False
        response = events[0]
        if not isinstance(response, Response) or self.protocol.state is not State.OPEN:
            raise SessionFailed(f"unexpected handshake outcome: {response!r}")
        if len(events) > 1:  # the target only speaks when spoken to
            raise SessionFailed("the proxy sent data before the client did")
        return True


def binary_frame(payload: bytes) -> bytes:
    """One masked binary frame (a fresh random mask each call), as a client must send."""
    return Frame(Opcode.BINARY, payload).serialize(mask=True)


def close_frame(code: int = 1000) -> bytes:
    return Frame(Opcode.CLOSE, Close(code, "").serialize()).serialize(mask=True)


def parse_header(buf: bytearray, start: int, end: int) -> tuple[int, int, int] | None:
    """``(opcode, payload length, header length)`` of the frame at ``buf[start:end]``,
    or None when the header is not complete yet."""
    if end - start < 2:
        return None
    b0, b1 = buf[start], buf[start + 1]
    if b1 & 0x80:
        raise SessionFailed("the proxy sent a masked frame")
    length = b1 & 0x7F
    if length == 126:
        if end - start < 4:
            return None
        return b0 & 0x0F, LENGTH16.unpack_from(buf, start + 2)[0], 4
    if length == 127:
        if end - start < 10:
            return None
        return b0 & 0x0F, LENGTH64.unpack_from(buf, start + 2)[0], 10
    return b0 & 0x0F, length, 2


def describe_close(payload: bytes) -> str:
    if len(payload) >= 2:
        code = LENGTH16.unpack_from(payload)[0]
        return f"proxy closed the session: {code} {payload[2:].decode(errors='replace')}"
    return "proxy closed the session"


HEADER_READ = 16  # enough for any server frame header, little of the payload after it


class FrameReader:
    """Reads server frames from a blocking socket through one reusable buffer.

    With ``discard``, reads stop short after headers and payloads are dropped in the
    kernel: the client then costs a few system calls per frame and no copying.
    """

    def __init__(self, sock: socket.socket, size: int = 1 << 20, discard: bool = False) -> None:
        self.sock = sock
        self.discard = discard
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.frames = 0  # data frames read, to report the proxies' framing

    def _recv(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):  # a partial frame at the very end: move it down
            left = self.end - self.start
            self.buffer[:left] = self.buffer[self.start : self.end]
            self.start, self.end = 0, left
        room = len(self.buffer) - self.end
        n = self.sock.recv_into(self.view[self.end :], HEADER_READ if self.discard else room)
        if n == 0:
            raise SessionFailed("the proxy closed the TCP connection")
        self.end += n

    def _header(self) -> tuple[int, int]:
        while (parsed := parse_header(self.buffer, self.start, self.end)) is None:
            self._recv()
        opcode, length, size = parsed
        self.start += size
        return opcode, length

    def _payload(self, length: int) -> bytes:
        while self.end - self.start < length:
            self._recv()
        data = bytes(self.view[self.start : self.start + length])
        self.start += length
        return data

    def _skip(self, length: int) -> None:
        """Drop ``length`` payload bytes; whole buffers of payload are never copied."""
        buffered = min(length, self.end - self.start)
        self.start += buffered
        length -= buffered
        flags = socket.MSG_TRUNC if self.discard else 0
        while length:
            self.start = self.end = 0
            n = self.sock.recv_into(self.view, min(length, len(self.buffer)), flags)
            if n == 0:
                raise SessionFailed("the proxy closed the TCP connection")
            length -= n

    def _data_header(self) -> int:
        """Length of the next data frame's payload.

        A close frame raises :class:`SessionFailed` with the proxy's reason; pings and
        pongs (neither proxy sends them unasked) are skipped.
        """
        while True:
            opcode, length = self._header()
            if opcode == OP_CLOSE:
                raise SessionFailed(describe_close(self._payload(length)))
            if opcode not in CONTROL_OPCODES:
                self.frames += 1
                return length
            self._skip(length)

    def payload(self) -> bytes:
        """The payload of the next data frame (for small messages)."""
        return self._payload(self._data_header())

    def skip_frame(self) -> int:
        """Consume the next data frame and return its payload length (for bulk data)."""
        length = self._data_header()
        self._skip(length)
        return length


def open_session(port: int, timeout: float) -> socket.socket:
    """A blocking socket with an open WebSocket session through the proxy on ``port``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = Handshake(port)
        sock.sendall(handshake.request())
        while not handshake.feed(sock.recv(4096)):
            pass
    except BaseException:
        sock.close()
        raise
    return sock
