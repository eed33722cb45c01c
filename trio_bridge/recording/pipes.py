"""Recording target data that is spliced to the client: a tee(2) into a pipe of its own.

On the zero-copy path the target's bytes go socket -> pipe -> client socket without
entering the bridge's memory. To record them, the recorder duplicates the pipe's
contents into a second pipe with tee(2) (which copies page references, not bytes)
before the relay splices the first one to the client; the recording thread later
splices the second pipe into the file. The bytes are copied once, into the page
cache, and never by Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

from ..pipes import PIPES, Pipe

TEE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Pipes all recordings of the process may hold at once (1 MiB each). The kernel caps
#: the pipe pages of a user (fs.pipe-user-pages-soft, 64 MiB by default) and past that
#: hands out 8 KiB pipes, which would slow the relay's own splicing for every session:
#: recordings get at most half of that budget, and drop (and mark) what they cannot hold.
MAX_RECORDING_PIPES = 32


class _PipeBudget:
    """How many pipes the recordings hold; taken in the event loop, returned in either
    thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.held -= 1


BUDGET = _PipeBudget(MAX_RECORDING_PIPES)


def _bind_tee() -> Callable[[int, int, int, int], int] | None:
    """libc's tee(2): the os module has splice(2) but not tee(2) (Python 3.11-3.13)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.tee
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    function.restype = ctypes.c_ssize_t
    return function


_TEE = _bind_tee()


def tee(source: int, destination: int, length: int, flags: int) -> int:
    """tee(2): duplicate up to ``length`` bytes from one pipe into another, leaving the
    source untouched. Raises OSError like the os module's calls."""
    if _TEE is None:
        raise OSError(0, "tee(2) is not available in this C library")
    copied = _TEE(source, destination, length, flags)
    if copied < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return copied


class PipeChunk:
    """``length`` bytes of target data waiting in a pipe for the recording thread.

    The chunk owns its pipe until it is released, exactly once: emptied into the file
    (the pipe goes back to the pool) or discarded (closed). Releasing it again does
    nothing, so every path that gives up an entry may release it without asking who
    did before: a pipe closed twice could close a descriptor the process has reused.
    """

    __slots__ = ("_budget", "_pipe", "length")

    def __init__(self, pipe: Pipe, length: int, budget: _PipeBudget | None = None) -> None:
        self._pipe: Pipe | None = pipe
        self.length = length
        self._budget = budget  # given back with the pipe

    def __len__(self) -> int:
        return self.length

    @property
    def read_end(self) -> int:
        assert self._pipe is not None, "the chunk was released"
        return self._pipe[0]

    def discard(self) -> None:
        """Drop the chunk unwritten (the pipe may hold data: closed, not pooled)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            PIPES.discard(pipe)
            self._give_back_budget()

    def emptied(self) -> None:
        """The chunk's bytes were read out: its pipe is empty and goes back to the pool."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            PIPES.give_back(pipe)
            self._give_back_budget()

    def _give_back_budget(self) -> None:
        if self._budget is not None:
            self._budget.give_back()


def tee_chunk(source: int, length: int) -> PipeChunk | str:
    """A copy of the first ``length`` bytes in the pipe read end ``source``, without
    consuming them; or why there is none (the frame then counts as lost).

    Never blocks: the source holds the bytes already and the copy goes into an empty
    pipe as large as the source's.
    """
    if not BUDGET.take():
        return f"all {BUDGET.limit} recording pipes in use (the disk was slower than the sessions)"
    try:
        pipe = PIPES.take()
    except OSError as exc:
        BUDGET.give_back()
        return f"no pipe to record spliced data ({exc.strerror or exc})"
    chunk = PipeChunk(pipe, length, BUDGET)
    try:
        copied = tee(source, pipe[1], length, TEE_FLAGS)
    except OSError as exc:
        chunk.discard()
        return f"tee(2) failed ({exc.strerror or exc})"
    if copied != length:
        chunk.discard()
        return "tee(2) fell short (pipe size capped by fs.pipe-user-pages-soft)"
    return chunk
