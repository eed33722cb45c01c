"""Keeping the recording thread from slowing a busy relay.

The writer thread costs the relay twice when the relay is the bottleneck: CPU time on
the relay's core where they share one (a one-core machine, a bridge pinned to a core,
a busy host), and the GIL it holds while it runs Python code, whatever the cores. A
lower scheduling priority for the thread is no answer: preempted while it holds the
GIL, it makes the event loop wait longer, not less. Instead, after each batch the
writer asks the kernel how busy the event-loop thread has been since its last look:
time on a CPU plus time runnable but waiting for one (``/proc/self/task/TID/schedstat``).
Above :data:`LOOP_BUSY_SHARE` of the elapsed time the relay is CPU-bound, and the
writer sleeps (without the GIL) :data:`BACK_OFF` times as long as it just worked. The
relay keeps its rate; the session's buffer fills and the recording drops what it
cannot keep, marking the gap. A relay with time to spare (every interactive session,
and bulk downstream on the splice path) never makes the writer wait.
"""

from __future__ import annotations

import time

#: Running or waiting to run for more than this share of the time, the event loop is
#: the bottleneck and the writer backs off.
LOOP_BUSY_SHARE = 0.9
#: How long the writer then sleeps, in multiples of the CPU time its batch took.
BACK_OFF = 3.0
#: The longest single back-off: the writer stays responsive to new sessions and to stop().
MAX_PAUSE = 0.05


class RelayFirst:
    """Tells the writer how long to pause after a batch; 0 while the relay has time to spare."""

    def __init__(self, loop_thread_id: int, busy_share: float = LOOP_BUSY_SHARE) -> None:
        self._path = f"/proc/self/task/{loop_thread_id}/schedstat"
        self._busy_share = busy_share
        self._last = self._sample()
        self._last_time = time.monotonic()

    @property
    def available(self) -> bool:
        return self._last is not None

    def pause_after(self, worked: float) -> float:
        """Seconds to sleep after a batch that took ``worked`` seconds of the writer's CPU."""
        sample = self._sample()
        now = time.monotonic()
        if sample is None or self._last is None:
            return 0.0
        busy = (sample[0] - self._last[0] + sample[1] - self._last[1]) / 1e9
        elapsed = now - self._last_time
        self._last, self._last_time = sample, now
        if elapsed <= 0 or busy <= self._busy_share * elapsed:
            return 0.0
        return min(MAX_PAUSE, BACK_OFF * worked)

    def _sample(self) -> tuple[int, int] | None:
        """The event-loop thread's time on a CPU and waiting for one, in nanoseconds."""
        try:
            with open(self._path, "rb") as stats:
                fields = stats.read().split()
            return int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):  # no schedstat (kernel config), or gone
            return None
