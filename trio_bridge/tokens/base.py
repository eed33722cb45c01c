"""The token plugin interface and what every plugin shares.

A token plugin answers one question: *which target does this token stand for?*
It is asked only with a token the client sent, already checked by
:func:`token_is_well_formed`, and it answers from the operator's data (a file, a
directory, a Redis store, a signed JWT). A client can never name a target by itself:
whatever the plugin returns still passes ``--allow-target`` before any connection.

Writing one (see docs/plugins.md)::

    class MyTokens:
        def __init__(self, source: str | None) -> None:    # --token-source, verbatim
            ...
        async def lookup(self, token: str) -> Address | None:
            ...    # None: unknown token (404); raise HttpRefusal for 403 & co;
                   # raise TokenStoreError when the store cannot answer (503)
        def reload(self) -> None:    # optional: SIGHUP
            ...

``lookup`` runs in the bridge's Trio event loop: use Trio I/O, or
``trio.to_thread.run_sync`` for blocking calls, and never block the loop.
"""

from __future__ import annotations

import string
from typing import Protocol, runtime_checkable

from ..config import Address, ConfigError, TcpAddress, UnixAddress, parse_host_port

MAX_TOKEN_LENGTH = 4096
# Visible ASCII: covers UUIDs, host names, base64url and JWTs; excludes whitespace,
# control characters and anything a log line or file name could be confused by.
TOKEN_ALPHABET = frozenset(string.ascii_letters + string.digits + string.punctuation)


@runtime_checkable
class TokenPlugin(Protocol):
    async def lookup(self, token: str) -> Address | None:
        """The target ``token`` stands for, or None when it is unknown."""
        ...


class TokenStoreError(Exception):
    """The token store could not answer (down, timed out, refused us): HTTP 503."""


def token_is_well_formed(token: str) -> bool:
    return 0 < len(token) <= MAX_TOKEN_LENGTH and all(c in TOKEN_ALPHABET for c in token)


def is_plain_file_name(token: str) -> bool:
    """True when ``token`` can name a file inside one directory and nothing else."""
    return token not in (".", "..") and "/" not in token and not token.startswith(".")


def parse_target(text: str, where: str) -> Address:
    """A target written by the operator: ``host:port``, ``[v6]:port`` or ``unix:/path``.

    Raises :class:`ConfigError` naming ``where`` (a file and line, a store key).
    """
    text = text.strip()
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ConfigError(f"{where}: {text!r}: a Unix-socket target needs an absolute path")
        return UnixAddress(path)
    address = parse_host_port(text, where)
    if not address.host or address.port == 0:
        raise ConfigError(f"{where}: {text!r} is not a usable host:port")
    return address


def require_source(plugin: str, source: str | None, shape: str) -> str:
    if not source:
        raise ConfigError(f"--token-plugin {plugin} needs --token-source {shape}")
    return source


def describe_token(token: str) -> str:
    """A token for log lines: enough to recognise it, not enough to reuse it."""
    return repr(token if len(token) <= 8 else token[:6] + "…") + f" ({len(token)} chars)"


__all__ = [
    "Address",
    "TcpAddress",
    "TokenPlugin",
    "TokenStoreError",
    "UnixAddress",
    "describe_token",
    "is_plain_file_name",
    "parse_target",
    "require_source",
    "token_is_well_formed",
]
