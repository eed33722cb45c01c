"""Log lines an attacker cannot forge and a flood cannot multiply.

Two things every log call that carries client input needs, kept in one place:

- :func:`escape` and :class:`EscapeControlCharacters`: request paths, header values,
  close reasons and Origins are client-supplied. A newline in one would forge a whole
  log line (under ``JOURNAL_STREAM`` even with its own ``<0>`` priority prefix), and an
  ESC sequence would reach the operator's terminal. The filter escapes control
  characters in every record's message after formatting, so no call site can forget
  it; tracebacks (``exc_info``) are formatted separately and keep their lines.
- :class:`RateLimitedLog`: a refusal that one client can cause thousands of times a
  second (a target that is down, a full connection table) is logged once, then
  summarised as a count per interval, so the journal stays readable and bounded.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators some
# viewers break lines at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (one visible line)."""
    return _CONTROL.sub(_escaped, text)


class EscapeControlCharacters(logging.Filter):
    """A handler filter that makes each record's message one line of visible text.

    The formatted message replaces ``msg`` and ``args`` (so a second handler does not
    format it again); structured ``extra`` fields are left as they are: journald
    stores them as binary-safe values, not as lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape(message)
        if escaped is not message:
            record.msg, record.args = escaped, None
        return True


@dataclass
class _Pending:
    first_at: float
    count: int = 0


class RateLimitedLog:
    """Logs the first event of a kind at once, then at most one summary per ``interval``.

    ``log_first(key, ...)`` writes its line when ``key`` has not been logged within the
    interval; otherwise it counts. The count is written as ``summary(key, n, interval)``
    by the next call for that key after the interval, or by :meth:`flush`. Memory is one
    small record per key seen in the last interval.
    """

    def __init__(
        self,
        logger: logging.Logger,
        summary: Callable[[str, int, float], str],
        *,
        interval: float = 60.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.summary = summary
        self.interval = interval
        self.level = level
        self.clock = clock
        self._pending: dict[str, _Pending] = {}

    def log(self, key: str, message: str, *args: object) -> None:
        now = self.clock()
        self._flush_old(now)
        pending = self._pending.get(key)
        if pending is not None:
            pending.count += 1
            return
        self._pending[key] = _Pending(now)
        self.logger.log(self.level, message, *args)

    def flush(self) -> None:
        """Write every pending summary now (e.g. at shutdown)."""
        self._flush_old(float("inf"))

    def _flush_old(self, now: float) -> None:
        # Keys are inserted in time order, so the old ones are at the front.
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if now - pending.first_at < self.interval:
                return
            del self._pending[key]
            if pending.count:
                self.logger.log(self.level, "%s", self.summary(key, pending.count, self.interval))
