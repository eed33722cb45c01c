"""The one parser of a request target, for the code that acts on it and for the logs.

A redactor that split a target differently from the code that reads tokens out of it
would let a token through to a log, so both go through :func:`split_target`.
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
    kept = path.rstrip("/")  # ends in the last non-empty segment, if there is one
    if path_token and kept:
        head, sep, _ = kept.rpartition("/")
        path = f"{head}{sep}...{path[len(kept) :]}"
    names = [field.partition("=")[0] for field in query.split("&") if field]
    return path + ("?" + "&".join(f"{name}=..." for name in names) if names else "")
