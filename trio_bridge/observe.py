"""What a session shows to an observer such as the recorder, and nothing else.

An observer sees every WebSocket frame of a session as websockets'
:class:`~websockets.frames.Frame` (opcode, payload, fin), tagged with its direction.
Data from the target is reported as the binary frame that carried it to the client.
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

from websockets.frames import Frame


class Direction(enum.Enum):
    UP = "client->target"
    DOWN = "target->client"


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    client: str
    target: str
    path: str
    subprotocol: str | None
    started_wall: float  # time.time() when the WebSocket opened


class SessionObserver(Protocol):
    def on_frame(self, direction: Direction, frame: Frame) -> None: ...

    def on_end(self, close_code: int | None, close_reason: str, closed_by: str) -> None: ...


class ObserverFactory(Protocol):
    def open(self, info: SessionInfo) -> SessionObserver | None:
        """An observer for a new session, or None to leave it unobserved."""
        ...
