"""websockify's UnixDomainSocketDirectory: the token names a Unix socket in one directory.

``--token-source /run/consoles`` and ``?token=vm1`` relay to ``/run/consoles/vm1``
when that is a socket. The token must be a plain file name (no ``/``, no leading
dot), so no token reaches outside the directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..addresses import Address, UnixAddress
from ..errors import ConfigError
from .base import is_plain_file_name, require_source


class UnixSocketDirectory:
    def __init__(self, source: str | None) -> None:
        self.source = Path(require_source("UnixDomainSocketDirectory", source, "DIRECTORY"))
        self.source = self.source.absolute()
        if not self.source.is_dir():
            raise ConfigError(f"--token-source {self.source}: not a directory")

    async def lookup(self, token: str) -> Address | None:
        if not is_plain_file_name(token):
            return None
        path = self.source / token
        try:
            mode = os.stat(path).st_mode  # one stat: fast enough for the event loop
        except OSError:
            return None
        return UnixAddress(str(path)) if stat.S_ISSOCK(mode) else None
