"""websockify's BaseTokenAPI and JSONTokenApi: an HTTP service says which target a token names.

``--token-source`` is a URL with one ``%s`` where the token goes, e.g.
``https://inventory.internal/vnc/%s``. The bridge GETs it for each new session:

- 200 (any 2xx): the answer names the target. ``BaseTokenAPI`` reads text,
  ``host:port`` (also ``[v6]:port``, ``unix:/path`` or websockify's
  ``unix_socket:/path``); ``JSONTokenApi`` reads ``{"host": ..., "port": ...}``
  (``"port"`` a number or digits; ``"host": "unix_socket"`` with the path as port,
  as websockify has it). An answer that names no usable target is a 502.
- 404: the token is unknown (404 to the client, like every other plugin).
- anything else, no answer, or no answer in time: the API cannot say now, so the
  client gets 503 (the token may well be fine) and the log one rate-limited line.

Unlike websockify, which pastes the token into the URL as it is and follows every
redirect, the token is percent-encoded (a token is chosen by the client: ``../admin``
or ``x?debug=1`` must not reshape the request) and no redirect is followed (a redirect
would carry the token to wherever the API's answer points). Answers are read up to
:data:`MAX_ANSWER` bytes, unencoded (no decompression bombs), within one deadline.

The HTTP client is httpx, on Trio through its own Trio backend. One client (one
connection pool) per plugin and per Trio run: the plugin is made before ``trio.run``
(when the configuration is checked, and before ``--workers`` processes exist), so
the client is made at the first lookup, inside the run, and a Trio system task closes
it when that run ends.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from typing import Any

import httpx
import trio

from ..addresses import Address, TcpAddress
from ..errors import ConfigError
from ..version import __version__
from .base import TokenStoreError, UnusableTarget, parse_target, require_source

log = logging.getLogger("trio_bridge.tokens")

# httpx logs every request's URL at INFO, and httpcore the response headers at DEBUG: the
# URL holds the token (a password for its target) and a Location header may too. Their
# lines are kept out unless an embedding program chose a level for these loggers itself.
for _name in ("httpx", "httpcore"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

PLACEHOLDER = "%s"
LOOKUP_TIMEOUT = 5.0  # the whole lookup: connecting, asking, reading the answer
CONNECT_TIMEOUT = 3.0
MAX_ANSWER = 64 * 1024  # a target is a few dozen bytes; JSON may carry other fields
MAX_CONNECTIONS = 16  # at once to the API: a flood of clients cannot flood it
SHAPE = "URL with %s where the token goes"


class _Marker:
    """A token that cannot occur in a URL as it is (it has a space), to check templates."""

    text = "trio bridge token"
    quoted = urllib.parse.quote(text, safe="")


def _split_template(plugin: str, source: str) -> tuple[str, str]:
    """``source`` around its one ``%s``; :class:`ConfigError` for anything but an http(s)
    URL with the placeholder in its path or query."""
    parts = source.split(PLACEHOLDER)
    if len(parts) != 2:
        raise ConfigError(
            f"--token-plugin {plugin}: --token-source needs exactly one %s where the token "
            f"goes, found {len(parts) - 1}"
        )
    try:
        url = httpx.URL(parts[0] + _Marker.quoted + parts[1])
    except httpx.InvalidURL as exc:
        raise ConfigError(f"--token-plugin {plugin}: --token-source is no URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"--token-plugin {plugin}: --token-source must be an http:// or https:// URL"
        )
    if _Marker.quoted not in url.raw_path.decode("ascii"):
        raise ConfigError(
            f"--token-plugin {plugin}: the %s of --token-source must be in the URL's path or query"
        )
    return parts[0], parts[1]


def _shown(source: str) -> str:
    """The URL template for log lines: without user:password and query values, which
    may hold the API's credentials."""
    parts = urllib.parse.urlsplit(source.replace(PLACEHOLDER, "TOKEN"))
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    query = "&".join(
        f"{name}=..." if value != "TOKEN" else f"{name}=%s"
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    path = parts.path.replace("TOKEN", PLACEHOLDER)
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


class _AnswerTooLong(Exception):
    pass


class TokenApi:
    """websockify's ``BaseTokenAPI``: the answer is ``host:port`` text (module docs)."""

    plugin = "BaseTokenAPI"
    accept = "text/plain"

    def __init__(self, source: str | None, *, timeout: float = LOOKUP_TIMEOUT) -> None:
        url = require_source(self.plugin, source, SHAPE)
        self.prefix, self.suffix = _split_template(self.plugin, url)
        self.source = _shown(url)
        self.timeout = timeout
        # System CAs (an internal CA installed on the host works), made here so that no
        # lookup reads CA files in the event loop.
        self._tls = ssl.create_default_context() if url.startswith("https") else None
        self._client: httpx.AsyncClient | None = None
        self._run: trio.lowlevel.TrioToken | None = None

    def __str__(self) -> str:
        return f"token API {self.source}"

    def _client_for_this_run(self) -> httpx.AsyncClient:
        """The client of the current Trio run, made at its first lookup (module docs)."""
        run = trio.lowlevel.current_trio_token()
        if self._client is None or self._run is not run:
            self._client, self._run = self._new_client(), run
            trio.lowlevel.spawn_system_task(
                _close_when_the_run_ends, self._client, name=f"{self} client"
            )
        return self._client

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout)),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=4),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the URL says where tokens go
            verify=self._tls or True,
            headers={
                "User-Agent": f"trio-bridge/{__version__}",
                "Accept": self.accept,
                "Accept-Encoding": "identity",
            },
        )

    async def lookup(self, token: str) -> Address | None:
        if token in (".", ".."):  # unreserved, so not encoded: they would climb a path
            return None
        url = self.prefix + urllib.parse.quote(token, safe="") + self.suffix
        client = self._client_for_this_run()
        try:
            with trio.fail_after(self.timeout):
                status, body = await self._get(client, url)
        except (trio.TooSlowError, httpx.TimeoutException):
            raise TokenStoreError(f"{self}: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise TokenStoreError(f"{self}: {_describe(exc, token)}") from None
        except _AnswerTooLong:
            raise UnusableTarget(
                f"{self} answered with more than {MAX_ANSWER} bytes, which is no target"
            ) from None
        if status == 404:
            return None
        if 300 <= status < 400:
            raise TokenStoreError(
                f"{self}: answered {status}, a redirect, which is not followed "
                "(give the final URL as --token-source)"
            )
        if not 200 <= status < 300:
            raise TokenStoreError(f"{self}: answered {status}")
        return self._target_or_refuse(body)

    async def _get(self, client: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
        """The answer's status, and its body when it is a success (bounded; raw)."""
        async with client.stream("GET", url) as response:
            if not response.is_success:
                return response.status_code, b""
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                return response.status_code, b""  # asked for none: no usable answer
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_ANSWER:
                raise _AnswerTooLong
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_ANSWER:
                    raise _AnswerTooLong
            return response.status_code, bytes(body)

    def _target_or_refuse(self, body: bytes) -> Address:
        try:
            return self.parse_answer(body)
        except (ValueError, ConfigError):
            # What is wrong, never the answer: it may hold anything.
            raise UnusableTarget(
                f"{self} answered with {self.expected} ({len(body)} bytes)"
            ) from None

    expected = "no host:port, [v6]:port or unix:/path with a valid host name"

    def parse_answer(self, body: bytes) -> Address:
        """The target in a success answer; ValueError or ConfigError when it names none."""
        text = body.decode("utf-8").strip()
        if "\n" in text:
            raise ValueError("more than one line")
        if text.startswith("unix_socket:"):  # websockify's form of a Unix socket
            text = "unix:" + text.removeprefix("unix_socket:")
        return parse_target(text, "")


class JsonTokenApi(TokenApi):
    """websockify's ``JSONTokenApi``: the answer is ``{"host": ..., "port": ...}``."""

    plugin = "JSONTokenApi"
    accept = "application/json"
    expected = 'no JSON object with a usable "host" and "port"'

    def parse_answer(self, body: bytes) -> Address:
        answer: Any = json.loads(body)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
        host, port = answer.get("host"), answer.get("port")
        if host == "unix_socket" and isinstance(port, str):
            return parse_target("unix:" + port, "")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise ValueError("no host and port")
        return TcpAddress(host, port)  # the router checks the host and the port's range


async def _close_when_the_run_ends(client: httpx.AsyncClient) -> None:
    """Holds ``client`` for the lifetime of the Trio run, then closes its connections."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await client.aclose()
            except Exception as exc:  # a system task must not raise: Trio would crash
                log.debug("closing the token API client: %s", type(exc).__name__)


def _describe(exc: httpx.HTTPError, token: str) -> str:
    """An httpx error for the log, with its message unless it quotes the token (httpx
    messages may hold the URL); the same text for every token, so it rate-limits."""
    message = str(exc)
    quoted = urllib.parse.quote(token, safe="")
    if not message or token in message or quoted in message:
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}"


__all__ = ["JsonTokenApi", "TokenApi"]
