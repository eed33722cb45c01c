"""The one parser of a request target, and the redactor built on it.

Everything that reads ``request.path`` (the file server, health and metrics endpoints,
token extraction) and everything that writes it to logs and recordings goes through
:func:`split_target`: a redactor that split the target differently from the code that
acts on it would let a value it did not see as a value (a token) through to a log.
"""

from __future__ import annotations


def split_target(target: str) -> tuple[str, str]:
    """The path and query of an origin-form request target (RFC 9112 3.2.1).

    ``#`` has no place in a request target (browsers never send the fragment): it and
    everything after it are dropped, by every user alike. Not ``urlsplit``: it takes a
    path starting with ``//`` for a host name, and raises on a stray ``[`` there.
    """
    path, _, query = target.partition("#")[0].partition("?")
    return path, query


def redact(target: str, *, path_token: bool = False) -> str:
    """``target`` for logs and recordings: every query value, and with ``path_token``
    the last non-empty path segment (where ``--token-from path`` reads the token),
    written ``...``. Tokens grant access, and logs outlive sessions."""
    path, query = split_target(target)
    if path_token:
        segments = path.split("/")
        last = max((i for i, segment in enumerate(segments) if segment), default=None)
        if last is not None:
            segments[last] = "..."
        path = "/".join(segments)
    names = [field.partition("=")[0] for field in query.split("&") if field]
    return path + ("?" + "&".join(f"{name}=..." for name in names) if names else "")
