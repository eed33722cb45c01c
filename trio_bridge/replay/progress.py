"""A progress line for long replays: on a terminal only, quiet in pipes, logs and CI."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

REDRAW_INTERVAL = 0.1
FALLBACK_COLUMNS = 80


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (80 when it cannot be told)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or FALLBACK_COLUMNS
    except (OSError, ValueError, AttributeError):
        return FALLBACK_COLUMNS


def fit(line: str, columns: int) -> str:
    """``line`` cut to fit in one row less one column: a line that fills the last column
    wraps on many terminals, and ``\\r`` then redraws only the second row."""
    room = max(columns - 1, 1)
    if len(line) <= room:
        return line
    return line[: room - 3] + "..." if room > 3 else line[:room]


class Progress:
    """Redraws one status line on ``stream`` (stderr) at most ten times a second, never
    wider than the terminal (its width is read at each redraw: it may be resized)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.total = max(total, 1)
        self._last = 0.0
        self._shown = False

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < REDRAW_INTERVAL:
            return
        self._last = now
        percent = min(100.0, 100.0 * done / self.total)
        # The figures first: a long file name is what gets cut.
        line = f"{percent:5.1f} %{'  ' + detail if detail else ''}  {self.label}"
        self.stream.write("\r" + fit(line, terminal_columns(self.stream)) + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        """Erase the line so that what follows starts on a clean one."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
