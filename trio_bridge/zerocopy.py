"""Zero-copy downstream relay: target socket -> pipe -> client socket with ``os.splice``.

Server-to-client WebSocket frames are not masked (RFC 6455 5.1), so a binary frame is
a 2-10 byte header followed by the target's bytes exactly as they arrived. On plain
TCP the payload can therefore move kernel-to-kernel through a pipe; Python only writes
the header (with ``MSG_MORE`` so header and payload leave in one segment). This halves
the CPU per byte relayed downstream, the direction that carries a VNC screen.

Only used when nothing has to transform the payload: no permessage-deflate and no
TLS; and the session chooses it only when nothing observes it (a recorder must see
the bytes). Pipes come from a small process-wide pool (:mod:`trio_bridge.pipes`) and
are held only through a burst of bulk data, so idle sessions cost no extra descriptors.

Nothing here knows a session: :func:`splice_burst` takes sockets, the client's channel
and callbacks, and the session decides when to splice and what a burst's end means.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import struct
from collections.abc import Callable

from websockets.protocol import OPEN

from .channel import ClientChannel, ClientGone
from .logs import RateLimitedLog
from .netio import PEER_GONE, SPLICE_FLAGS, Fairness, splice_all
from .pipes import PIPE_SIZE, PIPES, Pipe

log = logging.getLogger("trio_bridge.zerocopy")

CHUNK = PIPE_SIZE
OPCODE_BINARY_FIN = 0x82
SPLICE_AFTER = 64 * 1024  # a framed read at least this large switches to splicing
SPLICE_AVAILABLE = hasattr(os, "splice")  # Linux

# Out of descriptors, every bulk session would say so at each full read.
_no_pipe_log = RateLimitedLog(
    log, lambda key, n, s: f"{n} more times no pipe for splice ({key}) in the last {s:g} s"
)


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, final binary frame of ``length`` bytes (RFC 6455 5.2).

    websockets serialises whole frames only; this is the one piece of framing the
    zero-copy path needs on its own, checked against websockets' output in the tests.
    """
    if length < 126:
        return struct.pack("!BB", OPCODE_BINARY_FIN, length)
    if length < 1 << 16:
        return struct.pack("!BBH", OPCODE_BINARY_FIN, 126, length)
    return struct.pack("!BBQ", OPCODE_BINARY_FIN, 127, length)


class BurstEnd(enum.Enum):
    """Why :func:`splice_burst` returned, which decides what its caller does next."""

    IDLE = "the source has nothing ready, or no pipe could be had: relay framed again"
    EOF = "the source sent EOF"
    RESET = "the source reset the connection"
    CLOSING = "a close frame has gone out: no data frame may follow (RFC 6455 5.5.1)"


async def splice_burst(
    source: socket.socket,
    channel: ClientChannel,
    fairness: Fairness,
    sent: Callable[[int], None],
) -> BurstEnd:
    """Relay what ``source`` has ready to ``channel``'s client as binary frames, through a
    pooled pipe, until ``source`` would block; raises :class:`ClientGone`.

    ``sent(n)`` is called after each frame, so that byte counts stay current through a
    burst that may last as long as the stream. ``fairness`` is ticked once per frame:
    a source that is always ready must not keep other tasks from running (the
    contract in :mod:`trio_bridge.netio`).
    """
    try:
        pipe = PIPES.take()
    except OSError as exc:
        _no_pipe_log.log(exc.strerror or str(exc), "no pipe for splice (%s): relaying framed", exc)
        return BurstEnd.IDLE
    holds_data = False
    try:
        while True:
            try:
                n = os.splice(source.fileno(), pipe[1], CHUNK, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return BurstEnd.IDLE
            except PEER_GONE:
                return BurstEnd.RESET
            if n == 0:
                return BurstEnd.EOF
            holds_data = True
            if not await _send_frame(channel, pipe, n):
                return BurstEnd.CLOSING
            holds_data = False
            sent(n)
            await fairness.tick()
    finally:
        if holds_data:
            PIPES.discard(pipe)
        else:
            PIPES.give_back(pipe)


async def _send_frame(channel: ClientChannel, pipe: Pipe, n: int) -> bool:
    """Write one frame: header from Python, payload from the pipe, under the write lock.

    Returns False, sending nothing, once a close frame has gone out: no data frame may
    follow it (RFC 6455 5.5.1).
    """
    client = channel.transport.raw
    assert client is not None
    async with channel.write_turn:
        if channel.protocol.state is not OPEN:
            return False
        await channel.send_raw(binary_frame_header(n), more=True)
        try:
            await splice_all(pipe[0], client, n)
        except PEER_GONE as exc:
            raise ClientGone(str(exc)) from exc
    return True
