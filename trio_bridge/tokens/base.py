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

import hashlib
import ipaddress
import re
import string
import traceback
from typing import Protocol, runtime_checkable

import idna

from ..addresses import Address, TcpAddress, UnixAddress, parse_host_port
from ..errors import ConfigError

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


class PluginAnswerError(Exception):
    """A plugin answered something that is not a target (a plugin bug): HTTP 500.

    The message names the type of the answer only: its value may hold a secret.
    """


class UnusableTarget(ValueError):
    """A target no connection should be attempted to (an invalid host name, a port out
    of range); the message says why and may quote the target, never a token."""


MAX_HOST = 253  # RFC 1035 2.3.4, without the trailing dot
LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# The last label of a name is never all digits (RFC 3696 2) nor hex; a host that looks
# numeric but is not an address literal is one of inet_aton's forms (127.1, 0x7f.1):
# it would connect to an address that no network pattern was asked about.
NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


def canonical_host(host: object) -> str:
    """``host`` as the connection will use it: an IP literal, or a DNS name in its ASCII
    (IDNA) form -- exactly what Trio resolves, so ``--allow-target`` judges the name that
    is connected to (a full-width dot, U+FF0E, is a real dot once encoded). Raises
    :class:`UnusableTarget`.
    """
    if not isinstance(host, str) or not host:
        raise UnusableTarget(f"the host is a {type(host).__name__}, not a host name")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    shown = _quoted(host)
    try:
        name = host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError as exc:  # idna.IDNAError is one
        raise UnusableTarget(f"host {shown} is not a valid host name ({exc})") from None
    labels = name.removesuffix(".").split(".")
    if len(name.removesuffix(".")) > MAX_HOST:
        raise UnusableTarget(f"host {shown} is longer than {MAX_HOST} characters")
    if not all(LABEL.fullmatch(label) for label in labels):
        raise UnusableTarget(
            f"host {shown} is not a valid host name (labels of 1-63 letters, digits, - or _)"
        )
    if NUMERIC_LABEL.fullmatch(labels[-1]):
        raise UnusableTarget(f"host {shown} is neither a name nor an IP address literal")
    return name.lower()


def check_target(target: Address) -> Address:
    """``target`` ready to connect to, with its host in canonical form; raises
    :class:`UnusableTarget` for what no connection should be attempted to."""
    if isinstance(target, UnixAddress):
        path = target.path
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise UnusableTarget(
                f"Unix socket path {_quoted(str(path))} is not an absolute path (without NUL)"
            )
        return target
    port = target.port
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise UnusableTarget(f"port {port!r:.20} is not within 1-65535")
    host = canonical_host(target.host)
    return target if host == target.host else TcpAddress(host, port)


def _quoted(text: str, limit: int = 80) -> str:
    """Operator data for a log line: quoted with control characters escaped, and cut."""
    return repr(text if len(text) <= limit else text[:limit] + "…") + (
        f" ({len(text)} chars)" if len(text) > limit else ""
    )


def describe_failure(exc: BaseException) -> str:
    """``KeyError at /srv/plugin.py:42 in lookup()``: an operator plugin's exception for
    the log, without its message, which may quote the token or a password."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = (
        f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}()" if frames else ""
    )
    return f"{type(exc).__qualname__}{where}"


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
    try:
        return check_target(address)
    except UnusableTarget as exc:
        raise ConfigError(f"{where}: {exc}") from None


def require_source(plugin: str, source: str | None, shape: str) -> str:
    if not source:
        raise ConfigError(f"--token-plugin {plugin} needs --token-source {shape}")
    return source


def describe_token(token: str) -> str:
    """A token for log lines: ``sha256:1a2b3c4d`` (the first 8 hex digits of its SHA-256).

    Logs outlive sessions and travel further than the token store, so no character of
    a token reaches them: even a prefix narrows a short token down. The operator finds
    the token with ``printf %s TOKEN | sha256sum`` (docs/security.md).
    """
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]


__all__ = [
    "Address",
    "PluginAnswerError",
    "TcpAddress",
    "TokenPlugin",
    "TokenStoreError",
    "UnixAddress",
    "UnusableTarget",
    "canonical_host",
    "check_target",
    "describe_failure",
    "describe_token",
    "is_plain_file_name",
    "parse_target",
    "require_source",
    "token_is_well_formed",
]
