"""Kernel pipes for the zero-copy relay's splice(2): created non-blocking, enlarged, reused.

Creating a pipe costs two system calls and an ``F_SETPIPE_SZ``; a pool keeps a few
empty ones. A pipe that may still hold data is closed rather than pooled, so a pooled
pipe is always empty. Only the event loop uses it (one thread: no lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

#: The size pipes are enlarged to: the default ``/proc/sys/fs/pipe-max-size``.
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Pipe = tuple[int, int]  # (read end, write end)


class PipePool:
    """Empty pipes to reuse.

    Pipes are enlarged to PIPE_SIZE (1 MiB) so that one frame carries up to 1 MiB: with
    64 KiB pipes the per-chunk Python and system-call cost ate the gain of not copying.
    The kernel caps the pages a user's pipes may hold (fs.pipe-user-pages-soft, 64 MiB
    by default); past that a pipe keeps its default size, which is slower but correct.
    """

    def __init__(self, keep: int = 16) -> None:
        self._free: list[Pipe] = []
        self._keep = keep

    def take(self) -> Pipe:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def give_back(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: Pipe) -> None:
        """Close a pipe (which may hold data)."""
        os.close(pipe[0])
        os.close(pipe[1])


#: The process's pool.
PIPES = PipePool()
