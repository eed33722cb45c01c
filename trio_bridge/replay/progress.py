"""A progress line for long replays: on a terminal only, quiet in pipes, logs and CI."""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_INTERVAL = 0.1


class Progress:
    """Redraws one status line on ``stream`` (stderr) at most ten times a second."""

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
        line = f"{self.label}: {percent:5.1f} %{'  ' + detail if detail else ''}"
        self.stream.write("\r" + line[:200] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        """Erase the line so that what follows starts on a clean one."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
