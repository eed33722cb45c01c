"""The recording thread's back-off: it pauses only while the event loop is CPU-bound.

Real scheduling, no fakes: the kernel's own count of this thread's time on (and
waiting for) a CPU, while the thread spins and while it sleeps.
"""

from __future__ import annotations

import threading
import time

import pytest

from trio_bridge.recording.relay_first import RelayFirst


def spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def test_the_writer_pauses_only_while_the_loop_is_busy() -> None:
    relay_first = RelayFirst(threading.get_native_id())
    if not relay_first.available:
        pytest.skip("no /proc/self/task/*/schedstat on this kernel")
    spin(0.2)  # a relay using all the CPU it gets
    assert relay_first.pause_after(0.01) == pytest.approx(0.03)
    time.sleep(0.2)  # a relay waiting for traffic
    assert relay_first.pause_after(0.01) == 0.0
    spin(0.2)
    assert relay_first.pause_after(1.0) == 0.05  # never long: stop() and new sessions wait
