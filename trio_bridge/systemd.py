"""The bridge's side of the systemd service protocol: sd_notify, the watchdog, journald.

- ``Type=notify``: READY=1 once the bridge is serving, STATUS= with the live session
  count (sent when it changes, at most once a second), STOPPING=1 when draining starts,
  RELOADING=1 / READY=1 around a SIGHUP reload.
- Watchdog: when ``WatchdogSec=`` is set, WATCHDOG=1 every half ``WATCHDOG_USEC`` from a
  Trio task, so a blocked or busy-looping event loop really stops the pings and systemd
  restarts the service.
- journald: structured log records (the session end line carries SESSION_ID, CLIENT,
  TARGET, BYTES_UP, BYTES_DOWN, CLOSE_CODE, ...) when stderr is the journal or
  ``--log journal`` asks for it; plain text on stderr otherwise.

Everything goes through systemd-python (``systemd.daemon.notify``,
``systemd.journal.JournalHandler``), imported only when systemd is actually present,
so the bridge runs without that module anywhere else. Nothing here knows about HTTP or
WebSocket frames; the bridge is only asked for its session count and addresses.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from .errors import StartupError

if TYPE_CHECKING:
    from .server import Bridge

log = logging.getLogger("trio_bridge.systemd")

ReloadHook = Callable[[], Awaitable[object]]
"""Re-reads something on SIGHUP (later: token files, TLS certificates); raising keeps
the old state and is reported in the log and in the service status."""

STATUS_INTERVAL = 1.0  # seconds; systemd parses every STATUS= message, keep them rare
JOURNAL_SOCKET = "/run/systemd/journal/socket"
LOG_DESTINATIONS = ("auto", "stderr", "journal")
INSTALL_HINT = "pip install 'trio-bridge[systemd]'"


class SystemdUnavailable(StartupError):
    """systemd asked for something (notify, journal) that cannot be done here."""


# -- sd_notify -------------------------------------------------------------------------


class Notifier:
    """Sends sd_notify(3) messages; does nothing when there is no service manager.

    A failed send is logged once and otherwise ignored: the bridge keeps serving its
    clients even if systemd's socket went away.
    """

    def __init__(self, send: Callable[[str], object] | None) -> None:
        self._send = send
        self._warned = False

    @classmethod
    def from_environment(cls) -> Notifier:
        if not os.environ.get("NOTIFY_SOCKET"):
            return cls(None)
        try:
            import systemd.daemon
        except ImportError:
            # Without READY=1 a Type=notify unit would hang until TimeoutStartSec: fail now.
            raise SystemdUnavailable(
                "NOTIFY_SOCKET is set (Type=notify) but the systemd-python module is not "
                f"installed: {INSTALL_HINT}"
            ) from None
        notify: Callable[[str], object] = systemd.daemon.notify
        return cls(notify)

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def send(self, **fields: str) -> None:
        """One datagram with ``NAME=value`` lines, e.g. ``send(READY="1", STATUS="...")``."""
        if self._send is None:
            return
        message = "\n".join(f"{name}={value}" for name, value in fields.items())
        try:
            self._send(message)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd (%s): %s", message.split("\n")[0], exc)


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds when the watchdog is on for this process.

    systemd-python has no sd_watchdog_enabled(); this follows its rules: the
    variable must hold a positive number and WATCHDOG_PID, when set, must be us.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return value / 2e6 if value > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: systemd >= 253 requires it next to RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class ServiceLink:
    """What the service manager is told about one bridge, from start to exit."""

    def __init__(
        self,
        bridge: Bridge,
        notifier: Notifier,
        reload_hooks: Sequence[ReloadHook] = (),
    ) -> None:
        self.bridge = bridge
        self.notifier = notifier
        self.reload_hooks = list(reload_hooks)
        self._draining = False
        self._ready = trio.Event()
        self._last_status = ""
        self._reload_problem = ""  # shown in the status until a reload succeeds

    def ready(self) -> None:
        """The bridge is serving: READY=1 with the first status."""
        self._last_status = self.status()
        self.notifier.send(READY="1", STATUS=self._last_status)
        self._ready.set()

    def stopping(self) -> None:
        """Draining has begun: systemd shows "deactivating" instead of a failing service."""
        self._draining = True
        self._last_status = self.status()
        self.notifier.send(STOPPING="1", STATUS=self._last_status)

    async def reload(self) -> None:
        """SIGHUP: run every reload hook between RELOADING=1 and READY=1.

        Sessions are untouched; a failing hook is logged and leaves its old state.
        """
        log.info("reloading (%d reload hook(s))", len(self.reload_hooks))
        self.notifier.send(RELOADING="1", MONOTONIC_USEC=str(monotonic_usec()))
        failures = 0
        for hook in self.reload_hooks:
            try:
                await hook()
            except Exception:
                failures += 1
                log.exception("reload: %s failed; keeping its previous state", hook)
        problem = f"last reload: {failures} failure(s), see the log" if failures else ""
        self._reload_problem = problem
        self._last_status = self.status()
        self.notifier.send(READY="1", STATUS=self._last_status)

    def status(self) -> str:
        count = len(self.bridge.sessions)
        sessions = f"{count} session{'' if count == 1 else 's'} open"
        if self._draining:
            return f"draining: {sessions}"
        where = ", ".join(self.bridge.listen_addresses)
        status = f"{sessions} on {where}" if where else sessions
        return f"{status}; {self._reload_problem}" if self._reload_problem else status

    async def _report_status(self) -> None:
        await self._ready.wait()
        while True:
            await trio.sleep(STATUS_INTERVAL)
            status = self.status()
            if status != self._last_status:
                self._last_status = status
                self.notifier.send(STATUS=status)

    async def _pet_watchdog(self, interval: float) -> None:
        # Deliberately a plain task on the bridge's own event loop: if the loop stalls,
        # the pings stop, which is the whole point of the watchdog.
        while True:
            self.notifier.send(WATCHDOG="1")
            await trio.sleep(interval)


@asynccontextmanager
async def service_link(
    bridge: Bridge, reload_hooks: Sequence[ReloadHook] = ()
) -> AsyncIterator[ServiceLink]:
    """Keep systemd informed while the body serves; watchdog pings cover the whole body,
    draining included, so a long ``--shutdown-grace`` is not mistaken for a hang."""
    link = ServiceLink(bridge, Notifier.from_environment(), reload_hooks)
    if not link.notifier.enabled:
        yield link
        return
    async with trio.open_nursery() as nursery:
        interval = watchdog_interval()
        if interval is not None:
            log.debug("watchdog: pinging systemd every %g s", interval)
            nursery.start_soon(link._pet_watchdog, interval)
        nursery.start_soon(link._report_status)
        yield link
        nursery.cancel_scope.cancel()


# -- logging -----------------------------------------------------------------------------

_JOURNAL_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]*")


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to journald (JOURNAL_STREAM names its inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _journal_module_available() -> bool:
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return True


def log_handler(destination: str) -> logging.Handler:
    """A handler for ``--log``: ``auto`` (the journal when stderr goes there), ``stderr``
    or ``journal``. Raises :class:`SystemdUnavailable` when ``journal`` cannot work."""
    if destination not in LOG_DESTINATIONS:
        raise ValueError(f"unknown log destination {destination!r}")
    if destination == "journal":
        if not _journal_module_available():
            raise SystemdUnavailable(
                f"--log journal needs the systemd-python module: {INSTALL_HINT}"
            )
        if not os.path.exists(JOURNAL_SOCKET):
            raise SystemdUnavailable(f"--log journal: journald is not running ({JOURNAL_SOCKET})")
        return journal_handler()
    journal_stream = stderr_is_journal()
    if destination == "auto" and journal_stream and _journal_module_available():
        return journal_handler()
    handler = logging.StreamHandler(sys.stderr)
    if journal_stream:
        # journald timestamps each line and reads a "<priority>" prefix.
        handler.setFormatter(_PriorityPrefixFormatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def journal_handler() -> logging.Handler:
    """systemd-python's JournalHandler, sending only journal-worthy fields.

    JournalHandler forwards every LogRecord attribute (``msg``, ``args``, even
    ``message``, hence the positional-only parameter) as a field; journald drops the
    lowercase ones anyway, and a ``None`` would be stored as the text "None". Only
    valid, non-empty fields are sent.
    """
    import systemd.journal

    def send(message: str, /, **fields: object) -> None:
        kept = {k: v for k, v in fields.items() if v is not None and _JOURNAL_FIELD.fullmatch(k)}
        systemd.journal.send(message, **kept)

    handler: logging.Handler = systemd.journal.JournalHandler(
        SYSLOG_IDENTIFIER="trio-bridge", sender_function=send
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald shows for a logging level (3 err ... 7 debug)."""
    for limit, priority in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4)):
        if levelno <= limit:
            return priority
    return 3 if levelno <= logging.ERROR else 2


class _PriorityPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"
