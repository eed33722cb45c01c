"""What a session shows to an observer such as the recorder, and nothing else.

An observer sees every WebSocket frame of a session as an :class:`ObservedFrame`
(opcode, payload, fin), tagged with its direction: a type of this project's, so that
the observer API does not change with the WebSocket library underneath. Data from the
target is reported as the binary frame that carried it to the client.
Callbacks are synchronous and must not block: an observer that needs I/O buffers
and does it elsewhere, because the relay waits for nobody.

An observed session relays target data through Python, so that ``on_frame`` sees
every byte: only unobserved sessions splice bulk data to the client without reading it
(:mod:`trio_bridge.zerocopy`). Recording a session costs it the zero-copy path, which
matters only at rates far above what a recorded session (a VNC screen: 1-10 MB/s) needs.

An observer's failure is its own: the first exception it raises is logged with its
traceback and the observer is detached, seeing no more frames of that session, while
the relay goes on. ``on_end`` is still called, so it can finish and release its record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Direction(enum.Enum):
    UP = "client->target"
    DOWN = "target->client"


class Opcode(enum.IntEnum):
    """A frame's opcode, with its value on the wire (RFC 6455 5.2)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@dataclass(frozen=True, slots=True)
class ObservedFrame:
    """One WebSocket frame of a session.

    ``payload`` is unmasked and, with permessage-deflate, inflated (what the target
    sends or receives); a close frame's is the 2-byte code and the UTF-8 reason, or
    nothing. Always ``bytes``, never a buffer the relay reuses: an observer may keep
    it without a copy.
    """

    opcode: Opcode
    payload: bytes
    fin: bool = True


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    client: str
    target: str
    path: str
    subprotocol: str | None
    started_wall: float  # time.time() when the WebSocket opened


class SessionObserver(Protocol):
    def on_frame(self, direction: Direction, frame: ObservedFrame) -> None: ...

    def on_end(self, close_code: int | None, close_reason: str, closed_by: str) -> None: ...


class ObserverFactory(Protocol):
    def open(self, info: SessionInfo) -> SessionObserver | None:
        """An observer for a new session, or None to leave it unobserved."""
        ...
