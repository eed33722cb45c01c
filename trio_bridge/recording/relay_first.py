"""Keeping the recording thread from taking the relay's CPU.

Where the writer thread and the event loop share a core (a one-core machine, a bridge
pinned to a core, a busy host), every moment the writer runs is a moment the relay
waits for the CPU. A lower priority for the thread is no answer: it holds the GIL while
it runs Python code, and preempted at such a moment it makes the event loop wait
longer, not less. Instead the writer looks at the kernel's count of how long the
event-loop thread waited for a CPU (``run_delay`` in ``/proc/.../schedstat``) and, when
that wait is more than :data:`LOOP_WAIT_SHARE` of the time since its last look, sleeps
(without the GIL) :data:`BACK_OFF` times as long as it just worked. The relay keeps its
rate, the session's buffer fills and the recording drops what it cannot keep, marking
the gap. With a core to spare the event loop seldom waits and the writer seldom sleeps.
(The loop also waits for a CPU when other programs take its core; the writer backs off
then too, which is the side to err on.)
"""

from __future__ import annotations

import time

#: The share of wall time the event loop may spend waiting for a CPU before the
#: writer backs off.
LOOP_WAIT_SHARE = 0.05
#: How long the writer then sleeps, in multiples of the CPU time its batch took: the
#: relay gets the core back for several times what the writer took from it.
BACK_OFF = 3.0
#: The longest single back-off: the writer stays responsive to new sessions and to stop().
MAX_PAUSE = 0.05


class RelayFirst:
    """Tells the writer how long to pause after a batch; 0 when the relay is not waiting."""

    def __init__(self, loop_thread_id: int, share: float = LOOP_WAIT_SHARE) -> None:
        self._path = f"/proc/self/task/{loop_thread_id}/schedstat"
        self._share = share
        self._last_delay = self._run_delay()
        self._last_time = time.monotonic()

    @property
    def available(self) -> bool:
        return self._last_delay is not None

    def pause_after(self, worked: float) -> float:
        """Seconds to sleep after a batch that took ``worked`` seconds of the writer's CPU."""
        delay = self._run_delay()
        now = time.monotonic()
        if delay is None or self._last_delay is None:
            return 0.0
        waited = (delay - self._last_delay) / 1e9
        elapsed = now - self._last_time
        self._last_delay, self._last_time = delay, now
        if elapsed <= 0 or waited <= self._share * elapsed:
            return 0.0
        return min(MAX_PAUSE, BACK_OFF * worked)

    def _run_delay(self) -> int | None:
        """Nanoseconds the event-loop thread has spent runnable but waiting for a CPU."""
        try:
            with open(self._path, "rb") as stats:
                return int(stats.read().split()[1])
        except (OSError, ValueError, IndexError):  # no schedstat (kernel config), or gone
            return None
