"""The recording thread's back-off: it pauses only when the event loop waits for a CPU.

Real scheduling, no fakes: a process pinned to one core measures its own thread's wait
for the CPU while a busy process shares that core, and while nothing does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import os, sys, threading, time
    from trio_bridge.recording.relay_first import RelayFirst
    os.sched_setaffinity(0, {int(sys.argv[1])})
    relay_first = RelayFirst(threading.get_native_id())
    assert relay_first.available
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # the "event loop", busy, on the shared core
        pass
    print(relay_first.pause_after(0.01))
    """
)


def pause_seen(cpu: int, rival: bool) -> float:
    hog = None
    if rival:
        busy = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
        hog = subprocess.Popen([sys.executable, "-c", busy])
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(cpu)], capture_output=True, text=True, timeout=30
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat here")
def test_the_writer_pauses_only_while_the_loop_waits_for_its_core() -> None:
    cpu = max(os.sched_getaffinity(0))
    assert pause_seen(cpu, rival=True) == pytest.approx(0.03)  # waited half the time: back off
    assert pause_seen(cpu, rival=False) == 0.0  # had the core to itself: carry on
