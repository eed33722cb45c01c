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
from collections.abc import Callable

from ..pipes import PIPES, Pipe

TEE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2)


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

    __slots__ = ("_pipe", "length")

    def __init__(self, pipe: Pipe, length: int) -> None:
        self._pipe: Pipe | None = pipe
        self.length = length

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

    def emptied(self) -> None:
        """The chunk's bytes were read out: its pipe is empty and goes back to the pool."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            PIPES.give_back(pipe)


def tee_chunk(source: int, length: int) -> PipeChunk | str:
    """A copy of the first ``length`` bytes in the pipe read end ``source``, without
    consuming them; or why there is none (the frame then counts as lost).

    Never blocks: the source holds the bytes already and the copy goes into an empty
    pipe as large as the source's.
    """
    try:
        pipe = PIPES.take()
    except OSError as exc:
        return f"no pipe to record spliced data ({exc.strerror or exc})"
    try:
        copied = tee(source, pipe[1], length, TEE_FLAGS)
    except OSError as exc:
        PIPES.discard(pipe)
        return f"tee(2) failed ({exc.strerror or exc})"
    if copied != length:
        PIPES.discard(pipe)
        return "tee(2) fell short (pipe size capped by fs.pipe-user-pages-soft)"
    return PipeChunk(pipe, length)
