"""Token plugins backed by files the operator edits: websockify's TokenFile family.

``TokenFile`` / ``ReadOnlyTokenFile`` read ``token: target`` lines from one file or
from every file of a directory::

    # comments and blank lines are ignored
    vm1: 10.0.0.5:5900
    vm2: [2001:db8::7]:5901
    console: unix:/run/consoles/ttyS0.sock

``TokenFile`` notices edits: each lookup compares the files' size, mtime and inode
with the last load (a few ``stat`` calls) and re-reads only what changed.
``ReadOnlyTokenFile`` reads once, and again on :meth:`reload` (SIGHUP).
``TokenFileName`` is a directory in which the file *name* is the token and the
content the target.

A malformed line is logged with its file and line number and skipped: one typo
must not take every other token down. File reading runs in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import trio

from ..addresses import Address
from ..errors import ConfigError
from .base import (
    TokenStoreError,
    describe_token,
    is_plain_file_name,
    parse_target,
    require_source,
)

log = logging.getLogger("trio_bridge.tokens")

LINE = re.compile(r"^(?P<token>[^\s:][^:]*?)\s*:\s+(?P<target>\S.*)$")

Signature = tuple[tuple[str, int, int, int], ...]

MAX_TARGET_FILE = 4096
# "No file for this token": ENAMETOOLONG for a token longer than a file name may be.
NO_SUCH_FILE = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP}


def _files(source: Path) -> list[Path]:
    if not source.is_dir():
        return [source]
    return sorted(
        path for path in source.iterdir() if not path.name.startswith(".") and path.is_file()
    )


def _signature(source: Path) -> Signature:
    """What changes when a token file is edited, replaced, added or removed."""
    entries = []
    for path in _files(source):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(entries)


def parse_token_lines(text: str, name: str) -> dict[str, Address]:
    targets: dict[str, Address] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name}:{number}"
        match = LINE.match(line)
        if match is None:
            log.error("%s: not of the form 'token: host:port'; line skipped", where)
            continue
        try:
            targets[match["token"]] = parse_target(match["target"], where)
        except ConfigError as exc:
            log.error("%s; line skipped", exc)
    return targets


def load_token_files(source: Path) -> dict[str, Address]:
    """Every token of ``source`` (a file or a directory of files); later files win."""
    targets: dict[str, Address] = {}
    for path in _files(source):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue  # removed between listing and reading: the next lookup sees it
        targets.update(parse_token_lines(text, str(path)))
    return targets


class ReadOnlyTokenFile:
    """``token: target`` lines from a file or directory, read at start and on reload."""

    shape = "FILE_OR_DIRECTORY"

    def __init__(self, source: str | None) -> None:
        self.source = Path(require_source(type(self).__name__, source, self.shape))
        if not self.source.exists():
            raise ConfigError(f"--token-source {self.source}: no such file or directory")
        try:
            self._targets = load_token_files(self.source)
        except OSError as exc:
            raise ConfigError(f"--token-source {self.source}: {exc.strerror or exc}") from None

    def reload(self) -> None:
        """Re-read now; raises :class:`ConfigError` (keeping the old tokens) on failure."""
        try:
            self._targets = load_token_files(self.source)
        except OSError as exc:
            raise ConfigError(f"token file {self.source}: {exc.strerror or exc}") from None
        log.info("token file %s reloaded: %d tokens", self.source, len(self._targets))

    async def lookup(self, token: str) -> Address | None:
        return self._targets.get(token)


class TokenFile(ReadOnlyTokenFile):
    """Like :class:`ReadOnlyTokenFile`, but re-read whenever the files change."""

    def __init__(self, source: str | None) -> None:
        super().__init__(source)
        self._signature = _signature(self.source)
        self._lock = trio.Lock()

    def _refresh(self, known: Signature) -> tuple[Signature, dict[str, Address]] | None:
        signature = _signature(self.source)
        if signature == known:
            return None
        return signature, load_token_files(self.source)

    async def lookup(self, token: str) -> Address | None:
        async with self._lock:  # one re-read at a time; waiters then see its result
            try:
                fresh = await trio.to_thread.run_sync(self._refresh, self._signature)
            except OSError as exc:
                log.error("token file %s unreadable, keeping its tokens: %s", self.source, exc)
                fresh = None
            if fresh is not None:
                self._signature, self._targets = fresh
                log.info("token file %s re-read: %d tokens", self.source, len(self._targets))
        return self._targets.get(token)


class TokenFileName:
    """A directory where each file is named by its token and holds one target."""

    def __init__(self, source: str | None) -> None:
        self.source = Path(require_source("TokenFileName", source, "DIRECTORY"))
        if not self.source.is_dir():
            raise ConfigError(f"--token-source {self.source}: TokenFileName needs a directory")

    def _read(self, token: str) -> Address | None:
        """The target in the file named ``token``, None when there is none.

        Log lines name the file by the token's fingerprint (its name is the token) and
        say what is wrong with it, never its content (a misplaced file may be a secret).
        """
        path = self.source / token
        try:
            with path.open("rb") as file:
                data = file.read(MAX_TARGET_FILE + 1)
        except OSError as exc:
            if exc.errno in NO_SUCH_FILE:
                return None  # also names too long for the file system: no such token
            raise TokenStoreError(
                f"TokenFileName {self.source}: the file of token {describe_token(token)} "
                f"cannot be read: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            if len(data) > MAX_TARGET_FILE:
                raise ConfigError(f"longer than {MAX_TARGET_FILE} bytes")
            return parse_target(data.decode("utf-8"), "")
        except (ConfigError, UnicodeDecodeError):
            log.error(
                "TokenFileName %s: the file of token %s (%d bytes) does not hold one target: "
                "host:port with a valid host name, [v6]:port or unix:/path",
                self.source,
                describe_token(token),
                len(data),
            )
            return None

    async def lookup(self, token: str) -> Address | None:
        if not is_plain_file_name(token):
            return None
        return await trio.to_thread.run_sync(self._read, token)
