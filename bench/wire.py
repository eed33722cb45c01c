"""What the client tells the target through the proxy: the first bytes of a session.

The proxies relay bytes without looking at them, so the client steers the target
in-band. Shared by :mod:`bench.target` and the scenarios so both sides agree.
"""

from __future__ import annotations

import struct

MODE_DOWN = ord("D")  # then 8-byte counts: "send me this many more bytes"
MODE_UP = ord("U")  # then one 8-byte ack interval; then payload to discard
MODE_ECHO = ord("E")  # then payload to send back
ACK = b"A"
COUNT = struct.Struct("!Q")


def down_start(first: int) -> bytes:
    """Switch a fresh session to downstream mode and ask for ``first`` bytes."""
    return bytes([MODE_DOWN]) + COUNT.pack(first)


def down_more(n: int) -> bytes:
    return COUNT.pack(n)


def up_start(ack_every: int) -> bytes:
    """Switch a fresh session to upstream mode: one ``ACK`` per ``ack_every`` bytes."""
    return bytes([MODE_UP]) + COUNT.pack(ack_every)


def echo_start(payload: bytes = b"") -> bytes:
    return bytes([MODE_ECHO]) + payload
