"""CPU time and memory of a whole process tree, read from /proc.

websockify forks one process per connection, so its cost is spread over a tree whose
members come and go. Each process's ``/proc/PID/stat`` holds its own CPU time (all its
threads, exited ones included) and, in ``cutime``/``cstime``, the CPU time of every
child it has reaped (with their reaped descendants). Summing ``own + reaped children``
over the live members of the tree therefore counts every CPU second exactly once:
a live process reports its own time, a reaped one is inside its parent's figure.

The one unsafe moment is a process exiting *while* the tree is read (its time could be
counted twice or not at all), so the scenarios take snapshots only while their sessions
are open and idle: no member of the tree is exiting then.

The kernel reports these times in clock ticks (10 ms here) but derives them from its
nanosecond run-time counters, so long measurements are accurate to the tick.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Iterator

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
# Taken once, at import: after the bench pins itself, its own affinity is a subset.
ALLOWED_CPUS = frozenset(os.sched_getaffinity(0))


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants (zombies included: they still hold CPU time)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [pid, *(child.pid for child in children)]


def _stat_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime + cutime + cstime


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid``'s tree: live members plus everything they reaped."""
    return sum(_stat_ticks(p) for p in tree_pids(pid)) / CLOCK_TICKS


def own_cpu_seconds(pid: int) -> float:
    """CPU seconds of one process (client or target: single processes, never forking)."""
    return _stat_ticks(pid) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling, from /proc/stat: with the
    proxy's, client's and target's own figures it shows how much other programs took."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def _ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


KSOFTIRQD = _ksoftirqd_pids()


def softirq_thread_seconds() -> float:
    """CPU seconds of the kernel's ksoftirqd threads.

    At gigabytes per second over loopback the kernel defers part of the receive
    processing (work caused by the relayed traffic) to these threads; it is charged to
    neither the proxy nor anyone else, so it is reported apart rather than as "other
    programs".
    """
    return sum(_stat_ticks(p) for p in KSOFTIRQD) / CLOCK_TICKS


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of the tree: shared pages are split between their users,
    so forked children that share the parent's pages are not counted many times over."""
    return sum(_pss_bytes(p) for p in tree_pids(pid))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it.

    8,000 relayed sessions need 16,000 descriptors in the proxy and 8,000 in each of
    the client and the target; the default soft limit is often 1,024.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_layout() -> tuple[set[int], set[int]] | None:
    """(CPUs for the proxy, CPUs for the client and target), or None on a single CPU.

    The proxy gets a core of its own and the load generators share the others: the
    figures then do not depend on where the scheduler happened to put each process
    (on a VM, a wake-up across cores costs several times one on the same core), and
    the client and target can never take CPU time from the proxy.
    """
    cpus = sorted(ALLOWED_CPUS)
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def set_nice(nice: int) -> None:
    """Set this process's nice value (negative values need root)."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


AUTOGROUP = "/proc/self/autogroup"


@contextlib.contextmanager
def priority(nice: int) -> Iterator[None]:
    """This process's nice value, and its scheduler autogroup's, for the duration.

    Where Linux groups processes by session (sched_autogroup_enabled), a process's own
    nice value only ranks it within its session, not against other users' programs;
    the autogroup's nice value does that. It is put back afterwards, since the
    autogroup outlives the bench.
    """
    if not nice:
        yield
        return
    try:
        with open(AUTOGROUP) as f:
            previous: int | None = int(f.read().split("nice")[1])
    except (OSError, IndexError, ValueError):
        previous = None
    set_nice(nice)
    if previous is not None:
        with contextlib.suppress(OSError), open(AUTOGROUP, "w") as f:
            f.write(str(nice))
    try:
        yield
    finally:
        if previous is not None:
            with contextlib.suppress(OSError), open(AUTOGROUP, "w") as f:
                f.write(str(previous))


def child_setup(cpus: set[int] | None = None, nice: int = 0) -> None:
    """``preexec_fn`` for every subprocess: CPU affinity, priority, the raised fd limit,
    and death with the bench.

    PR_SET_PDEATHSIG makes the kernel send SIGTERM to the child if the bench dies
    without cleaning up (e.g. SIGKILL), so no proxy outlives it. Affinity is inherited
    by whatever the child forks (websockify's session handlers).
    """
    pin(cpus)
    set_nice(nice)
    raise_fd_limit()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
