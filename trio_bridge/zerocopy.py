"""Zero-copy downstream relay: target socket -> pipe -> client socket with ``os.splice``.

Server-to-client WebSocket frames are not masked (RFC 6455 5.1), so a binary frame is
a 2-10 byte header followed by the target's bytes exactly as they arrived. On plain
TCP the payload can therefore move kernel-to-kernel through a pipe; Python only writes
the header (with ``MSG_MORE`` so header and payload leave in one segment). This halves
the CPU per byte relayed downstream, the direction that carries a VNC screen.

Only used when nothing has to transform the payload: no permessage-deflate and no
TLS; and the session chooses it only when nothing observes it (a recorder must see
the bytes). Pipes come from a small process-wide pool (:mod:`trio_bridge.pipes`) and
are held only while a chunk is in flight, so idle sessions cost no extra descriptors.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

import trio
from websockets.protocol import OPEN

from .channel import ClientGone
from .netio import PEER_GONE, Fairness
from .pipes import PIPE_SIZE, PIPES

log = logging.getLogger("trio_bridge.zerocopy")

if TYPE_CHECKING:
    from .session import Session

CHUNK = PIPE_SIZE
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
OPCODE_BINARY_FIN = 0x82
SPLICE_AFTER = 64 * 1024  # a framed read at least this large switches to splicing


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


class SpliceDownstream:
    """Relays target -> client for one session with splice(2)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @staticmethod
    def usable(session: Session) -> bool:
        return (
            hasattr(os, "splice")
            and not session.protocol.extensions
            and session.channel.transport.raw is not None
            and session.target.raw is not None
        )

    async def run(self) -> None:
        session = self.session
        target = session.target.raw
        assert target is not None
        fairness = Fairness()
        pipe: tuple[int, int] | None = None
        holds_data = False
        warned = False
        try:
            while True:
                if pipe is None:
                    # After a wait, the first chunk goes the ordinary way: interactive
                    # traffic (keystrokes, small screen updates) costs fewer system calls
                    # without a pipe, and an idle session holds none (two descriptors
                    # each). Only a full read, the sign of a bulk stream, switches to
                    # splicing until the target has nothing more to give.
                    n = await session.relay_framed_chunk()
                    if n == 0:
                        return
                    if n < SPLICE_AFTER:
                        continue
                    try:
                        pipe = PIPES.take()
                    except OSError as exc:
                        if not warned:
                            warned = True
                            log.warning("no pipe for splice (%s): relaying framed", exc)
                        continue
                try:
                    n = os.splice(target.fileno(), pipe[1], CHUNK, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    PIPES.give_back(pipe)
                    pipe = None
                    continue
                except PEER_GONE:
                    session.target_reset()
                    return
                if n == 0:
                    session.target_closed()
                    return
                holds_data = True
                if not await self._drain(pipe, n):
                    return
                holds_data = False
                session.stats.bytes_down += n
                await fairness.tick()
        finally:
            if pipe is not None:
                if holds_data:
                    PIPES.discard(pipe)
                else:
                    PIPES.give_back(pipe)

    async def _drain(self, pipe: tuple[int, int], n: int) -> bool:
        """Write one frame: header from Python, payload from the pipe, under the write lock.

        Returns False, sending nothing, once a close frame has gone out: no data frame
        may follow it (RFC 6455 5.5.1).
        """
        session = self.session
        channel = session.channel
        client = channel.transport.raw
        assert client is not None
        async with channel.write_turn:
            if session.protocol.state is not OPEN:
                return False
            await channel.send_raw(binary_frame_header(n), more=True)
            left = n
            while left:
                try:
                    moved = os.splice(pipe[0], client.fileno(), left, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(client)
                    continue
                except PEER_GONE as exc:
                    raise ClientGone(str(exc)) from exc
                left -= moved
        return True
