"""When each session's next ping is due, for all sessions of a bridge, in one task.

A task per session sleeping until its next ping cost 4.5 KiB per idle session (1,000
idle sessions: 28.9 KiB each with it, 24.4 without, ``./dev bench``); a heap entry
costs about a hundred bytes. The ping itself (write it, await the pong) runs as a short
task in its session's own nursery, so a client that stopped reading holds up its own
session only, never this timer.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from typing import NoReturn, Protocol

import trio


class Pinged(Protocol):
    def ping_due(self) -> None:
        """Start this session's ping now (it schedules its next one when the pong comes)."""


class Heartbeats:
    """The ping timer of every session of one bridge; :meth:`run` in the bridge's nursery."""

    def __init__(self) -> None:
        # (when, tie-breaker, session): weak, so an ended session is not kept alive
        # until its next ping would have been due.
        self._due: list[tuple[float, int, weakref.ref[Pinged]]] = []
        self._order = itertools.count()
        self._earlier = trio.Event()

    def schedule(self, session: Pinged, when: float) -> None:
        """Call ``session.ping_due()`` at ``when`` (trio's clock), if it still exists."""
        if not self._due or when < self._due[0][0]:
            self._earlier.set()
        heapq.heappush(self._due, (when, next(self._order), weakref.ref(session)))

    async def run(self) -> NoReturn:
        while True:
            with trio.move_on_at(self._due[0][0] if self._due else math.inf):
                await self._earlier.wait()
            self._earlier = trio.Event()
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                session = heapq.heappop(self._due)[2]()
                if session is not None:
                    session.ping_due()
