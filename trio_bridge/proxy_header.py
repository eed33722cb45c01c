"""The PROXY protocol header (HAProxy's, versions 1 and 2): who the client of a load
balancer's connection really is.

A load balancer in TCP mode (HAProxy ``send-proxy-v2``, AWS NLB, ...) opens its own
connection to the bridge and writes this header before the client's first byte. The
bridge reads it only from the networks given to ``--proxy-protocol`` and then requires
it: the spec forbids guessing whether a header is there, since anyone allowed to send
one can pose as any address (docs/security.md).

:func:`parse` is sans-I/O and strict: anything that does not match the spec exactly
raises :class:`ProxyHeaderError` naming the problem, never another exception (a property
test holds it to that). It returns None only while what it was given can still become a
valid header, so every byte it has seen by then belongs to the header: the reader below
consumes them without ever taking a byte of the TLS or HTTP that follows.

No library is used: PyPI's ``proxy-protocol`` (0.11.3, alpha) accepts ports such as
``0080``, ``+80`` and ``8_0``, unassigned v2 families and protocols, and lets
``struct.error``, ``UnicodeDecodeError`` and ``AddressValueError`` out of malformed
headers; its reader is asyncio's. The format is small enough to parse here in full.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

import trio

from .logs import escape
from .netio import Fairness

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", the spec's worst case
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and protocol, length
_V2_FIXED = struct.Struct("!BBH")

# v2 family and protocol byte -> address size, for TCP over IPv4 and IPv6. Datagram
# families (UDP, 0x12 and 0x22) cannot describe a stream connection and are refused.
_V2_STREAM = {0x11: 4, 0x21: 16}
_V2_NO_ADDRESS = {0x00, 0x31}  # UNSPEC, AF_UNIX stream: no IP address to use
_LOCAL, _PROXY = 0x0, 0x1


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: ``source`` is the client (host, port), or None when the header
    carries no address to use (v2 LOCAL, a health check by the proxy itself; v1
    ``UNKNOWN``; a v2 UNSPEC or Unix-socket family): the TCP peer is the client then.
    ``length`` is how many bytes the header took."""

    version: int
    source: tuple[str, int] | None
    length: int


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while ``data`` is a valid but
    incomplete beginning of one; raises :class:`ProxyHeaderError` otherwise."""
    if data[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise ProxyHeaderError(f"not a PROXY protocol header: {_show(data)}")
        return _parse_v2(data)
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyHeaderError(f"no PROXY protocol header: the connection starts {_show(data)}")
    return _parse_v1(data)


def looks_like_header(data: bytes) -> bool:
    """Whether ``data`` (a connection's first bytes) opens a PROXY header of either version."""
    return data.startswith(V1_PREFIX) or (len(data) >= 5 and V2_SIGNATURE.startswith(data[:12]))


def _show(data: bytes, limit: int = 40) -> str:
    """Client bytes for a log line: escaped, cut short."""
    text = escape(data[:limit].decode("ascii", "backslashreplace"))
    return f"'{text}'" + ("..." if len(data) > limit else "")


# -- version 1: one line of text ---------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX_LENGTH]
    end = head.find(b"\r\n")
    if end < 0:
        # A lone LF, or a CR followed by anything but LF, never ends the line (spec 2.1);
        # a CR as the last byte seen may still be followed by its LF.
        if b"\n" in head or b"\r" in head[:-1]:
            raise ProxyHeaderError(f"PROXY v1 line not ended by CRLF: {_show(head)}")
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        return None
    line = data[len(V1_PREFIX) : end]
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":
        # The sender could not tell; the rest of the line is to be ignored (spec 2.1).
        return ProxyHeader(1, None, end + 2)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 line malformed: {_show(data[: end + 2])}")
    family, source, destination, source_port, destination_port = fields
    version = 4 if family == b"TCP4" else 6
    host = _v1_address(source, version)
    _v1_address(destination, version)
    port = _v1_port(source_port)
    _v1_port(destination_port)
    return ProxyHeader(1, (host, port), end + 2)


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is one too
        raise ProxyHeaderError(f"PROXY v1 address {_show(text)} is not an IP address") from None
    if address.version != version or "%" in str(address):
        raise ProxyHeaderError(f"PROXY v1 address {_show(text)} is not an IPv{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    # Decimal digits only, no leading zero (the spec: no confusion with octal), <= 65535.
    if not text.isdigit() or (text.startswith(b"0") and text != b"0") or len(text) > 5:
        raise ProxyHeaderError(f"PROXY v1 port {_show(text)} is not a port number")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {port} is out of range")
    return port


# -- version 2: binary -------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family, length = _V2_FIXED.unpack_from(data, len(V2_SIGNATURE))
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 header with unassigned command {command:#x}")
    # LOCAL: the proxy's own connection (a health check); the family is to be ignored
    # and the address block, whatever its length, skipped.
    if command == _PROXY and family not in _V2_STREAM and family not in _V2_NO_ADDRESS:
        raise ProxyHeaderError(
            f"PROXY v2 header with family/protocol {family:#04x} (not TCP or UNSPEC)"
        )
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if command == _LOCAL or family in _V2_NO_ADDRESS:
        # UNSPEC and Unix sockets carry no IP address: the TCP peer stands for the client.
        return ProxyHeader(2, None, total)
    size = _V2_STREAM[family]
    if length < 2 * (size + 2):
        raise ProxyHeaderError(
            f"PROXY v2 address block of {length} bytes, too short for family {family:#04x}"
        )
    block = data[V2_FIXED:total]
    source = ipaddress.ip_address(block[:size])
    (port,) = struct.unpack_from("!H", block, 2 * size)
    return ProxyHeader(2, (str(source), port), total)


# -- reading it from a socket ------------------------------------------------------------


async def receive(sock: socket.socket) -> ProxyHeader:
    """Read the header at the start of the non-blocking ``sock`` and nothing after it.

    Raises :class:`ProxyHeaderError` (an invalid header, or the connection ended first).
    Waits without limit: the caller bounds the time (the handshake budget). Bytes are
    peeked, then consumed only up to the header's end, so TLS or HTTP can follow.
    """
    fairness = Fairness()
    seen = bytearray()
    while True:
        wanted = _peek_size(seen)
        chunk = await _peek(sock, wanted)
        if not chunk:
            raise ProxyHeaderError(
                "the connection closed before a complete PROXY protocol header"
                + (f" (got {_show(bytes(seen))})" if seen else "")
            )
        header = parse(bytes(seen + chunk))
        take = len(chunk) if header is None else header.length - len(seen)
        try:
            seen += sock.recv(take)  # already peeked: all there, returns at once
        except OSError as exc:  # a reset between the peek and the read
            raise ProxyHeaderError(f"the connection failed: {exc.strerror}") from None
        if header is not None:
            return header
        await fairness.tick()


async def opens_with_header(sock: socket.socket) -> bool:
    """Whether the first bytes on ``sock`` are a PROXY header (peeked, not consumed);
    waits for them without limit: the caller bounds the time."""
    return looks_like_header(await _peek(sock, len(V2_SIGNATURE)))


def _peek_size(seen: bytearray) -> int:
    """The most bytes the header can still take: never read past its end."""
    if len(seen) >= V2_FIXED and seen.startswith(V2_SIGNATURE):
        length: int = _V2_FIXED.unpack_from(seen, len(V2_SIGNATURE))[2]
        return V2_FIXED + length - len(seen)
    return max(1, V1_MAX_LENGTH - len(seen))


async def _peek(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError:  # reset, timed out: the header is not coming
            return b""
