"""Authentication gates: HTTP Basic, an Origin allowlist, client-certificate names.

Each is a :class:`~trio_bridge.routing.RequestGate`, asked before the target is
resolved, so a refused client causes no token lookup and no connection. Refusals say
no more than the client needs: Basic auth answers 401 with a challenge whether the
user or the password was wrong; a foreign Origin or an unaccepted certificate gets
403. The server logs every refusal with the client address; the details a client
must not see (which origin, which certificate names) go to the log from here.

Names follow websockify's ``--auth-plugin`` (``BasicHTTPAuth``, ``ExpectOrigin``,
``ClientCertCNAuth``, also as ``websockify.auth_plugins.X``) with the same
``--auth-source`` strings; ``basic``, ``origin`` and ``client-cert`` are shorter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import logging
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import trio
from websockets.http11 import Request

from .config import Config
from .errors import ConfigError
from .routing import ClientInfo, HttpRefusal, RequestGate
from .tokens.base import describe_failure
from .tokens.registry import load_plugin

log = logging.getLogger("trio_bridge.auth")

UNAUTHORIZED, FORBIDDEN, INTERNAL_ERROR = 401, 403, 500
REALM = "trio-bridge"

AUTH_PLUGINS = {
    "BasicHTTPAuth": "trio_bridge.auth:BasicAuth",
    "ExpectOrigin": "trio_bridge.auth:OriginAllowlist",
    "ClientCertCNAuth": "trio_bridge.auth:ClientCertNames",
}
AUTH_SHORT_NAMES = {
    "basic": "BasicHTTPAuth",
    "origin": "ExpectOrigin",
    "client-cert": "ClientCertCNAuth",
}


def _one_header(request: Request, name: str) -> str | None:
    """The header's value when it appears exactly once (a repeated one is suspect)."""
    values = request.headers.get_all(name)
    return values[0] if len(values) == 1 else None


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _decode(raw: bytes) -> str:
    """RFC 7617 says UTF-8 when ``charset="UTF-8"`` was offered; older clients send Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """``Authorization: Basic base64(user:password)`` -> (user, password bytes)."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    return (_decode(user), password) if sep else None


def read_credentials(source: str) -> dict[str, bytes]:
    """``user:password`` lines from a file (websockify takes one pair verbatim instead).

    Only digests are kept in memory, so every comparison is between equal-length values.
    """
    path = Path(source)
    if not path.is_file():
        if ":" not in source:
            raise ConfigError(f"--auth-source {source}: no such credentials file")
        log.warning(
            "BasicHTTPAuth: credentials on the command line are visible to every "
            "local user (ps); prefer a credentials file"
        )
        lines = [source]
    else:
        try:
            mode = path.stat().st_mode
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--auth-source {source}: cannot read it: {exc}") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("credentials file %s is readable by other users (chmod 600 it)", source)
    credentials: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"--auth-source {source}:{number}: expected user:password")
        credentials[user] = _digest(password.encode("utf-8"))
    if not credentials:
        raise ConfigError(f"--auth-source {source}: no user:password line")
    return credentials


class BasicAuth:
    """HTTP Basic authentication against a credentials file, compared in constant time."""

    _NO_USER = _digest(b"\0 no such user \0")

    def __init__(self, source: str | None) -> None:
        if not source:
            raise ConfigError(
                "--auth-plugin BasicHTTPAuth needs --auth-source FILE (user:password lines)"
            )
        self.source = source
        self.credentials = read_credentials(source)
        self.challenge = [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')]

    def reload(self) -> None:
        """Re-read the credentials; raises :class:`ConfigError` (keeping the old ones)."""
        self.credentials = read_credentials(self.source)
        log.info("credentials %s reloaded: %d users", self.source, len(self.credentials))

    def verify(self, user: str, password: bytes) -> bool:
        # Same work whether or not the user exists: timing tells nothing about names.
        expected = self.credentials.get(user, self._NO_USER)
        matches = hmac.compare_digest(_digest(password), expected)
        return matches and user in self.credentials

    async def check(self, request: Request, client: ClientInfo) -> None:
        given = parse_basic(_one_header(request, "Authorization"))
        if given is not None and self.verify(*given):
            return
        if given is not None:
            log.info("client %s: wrong user name or password (user %r)", client.peer, given[0][:64])
        raise HttpRefusal(UNAUTHORIZED, "Authentication required", self.challenge)


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split_origin(text: str) -> tuple[str, str, int | None] | None:
    """``scheme://host[:port]`` -> (scheme, host, port), lower-cased; None if malformed."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS.get(scheme)


class OriginAllowlist:
    """Refuses browsers on other sites (cross-site WebSocket hijacking).

    Entries are origins as browsers send them (``https://vnc.example.com``, with a port
    when it is not the default); a leading ``*.`` matches any subdomain. A request
    without an Origin header is refused too, as websockify does: browsers always send
    one, and a client that can omit it could as well forge it.
    """

    def __init__(self, source: str | None) -> None:
        self.source = (source or "").split()
        if not self.source:
            raise ConfigError("--allow-origin / ExpectOrigin needs at least one origin")
        self.allowed: list[tuple[str, str, int | None]] = []
        for entry in self.source:
            parsed = _split_origin(entry)
            if parsed is None:
                raise ConfigError(f"--allow-origin {entry!r}: expected scheme://host[:port]")
            self.allowed.append(parsed)

    def allows(self, origin: str) -> bool:
        parsed = _split_origin(origin)
        if parsed is None:
            return False
        scheme, host, port = parsed
        for a_scheme, a_host, a_port in self.allowed:
            if (scheme, port) != (a_scheme, a_port):
                continue
            if host == a_host or (a_host.startswith("*.") and host.endswith(a_host[1:])):
                return True
        return False

    async def check(self, request: Request, client: ClientInfo) -> None:
        origin = _one_header(request, "Origin")
        if origin is not None and self.allows(origin):
            return
        log.info("client %s: Origin %r is not allowed", client.peer, (origin or "")[:200] or None)
        raise HttpRefusal(FORBIDDEN, "Origin not allowed")


def certificate_names(certificate: dict[str, Any] | None) -> set[str]:
    """The subject common names and subjectAltName values of a verified certificate."""
    if not certificate:
        return set()
    names = {
        value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"
    }
    names.update(value for _, value in certificate.get("subjectAltName", ()))
    return names


class ClientCertNames:
    """Lets in clients whose verified certificate names one of the listed CNs or SANs.

    Needs ``--cert`` and ``--cafile`` (and ``--verify-client`` to refuse certificate-less
    clients already at the TLS handshake); a plain ws:// client is refused with 403.
    """

    def __init__(self, source: str | None) -> None:
        self.names = set((source or "").split())
        if not self.names:
            raise ConfigError("--auth-plugin ClientCertCNAuth needs --auth-source 'NAME ...'")

    async def check(self, request: Request, client: ClientInfo) -> None:
        presented = certificate_names(client.certificate)
        if presented & self.names:
            return
        log.info(
            "client %s: client certificate %s is not accepted",
            client.peer,
            ", ".join(repr(name) for name in sorted(presented)) or "(none)",
        )
        raise HttpRefusal(FORBIDDEN, "Client certificate not accepted")


class BlockingAuthPlugin:
    """Adapts a websockify-style plugin: blocking ``authenticate(headers, target_host,
    target_port)`` raising an error with ``code``, ``msg`` and ``headers`` attributes."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    async def check(self, request: Request, client: ClientInfo) -> object:
        """None (or True) lets the request through, as :class:`CheckedGate` requires."""
        try:
            return await trio.to_thread.run_sync(
                self.plugin.authenticate, request.headers, None, None
            )
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, int):
                raise
            headers = getattr(exc, "headers", None) or {}
            message = getattr(exc, "msg", None) or "Forbidden"
            log.info("client %s: refused by %s: %r", client.peer, type(self.plugin).__name__, exc)
            raise HttpRefusal(code, str(message), list(headers.items())) from None


class CheckedGate:
    """An operator's gate, held to its contract: ``check`` lets a request through by
    returning None (or True); it refuses by raising :class:`HttpRefusal`.

    Any other answer (False, a string, a tuple) is a plugin bug, and so is any other
    exception: either way the request is refused with 500, never let through, and one
    ERROR line names the plugin class and the type -- not the value or the exception's
    message, which may quote a password.
    """

    def __init__(self, gate: Any, name: str) -> None:
        self.gate = gate
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "gate":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attribute)
        return getattr(self.gate, attribute)  # reload() and the like, when it has them

    async def check(self, request: Request, client: ClientInfo) -> None:
        try:
            answer = await self.gate.check(request, client)
        except HttpRefusal:
            raise
        except Exception as exc:
            log.error(
                "client %s: auth plugin %s raised %s", client.peer, self.name, describe_failure(exc)
            )
            raise HttpRefusal(INTERNAL_ERROR, "Internal error while checking the request") from None
        if answer is not None and answer is not True:
            log.error(
                "client %s: auth plugin %s returned a %s, not None; request refused",
                client.peer,
                self.name,
                type(answer).__qualname__,
            )
            raise HttpRefusal(INTERNAL_ERROR, "Internal error while checking the request")


def load_auth_plugin(name: str, source: str | None) -> RequestGate:
    plugin = load_plugin(
        name, source, AUTH_PLUGINS, AUTH_SHORT_NAMES, "websockify.auth_plugins", "--auth-plugin"
    )
    if isinstance(plugin, BasicAuth | OriginAllowlist | ClientCertNames):
        return plugin
    label = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    if inspect.iscoroutinefunction(getattr(plugin, "check", None)):
        return CheckedGate(plugin, label)
    if callable(getattr(plugin, "authenticate", None)):
        return CheckedGate(BlockingAuthPlugin(plugin), label)
    raise ConfigError(f"--auth-plugin {name}: the plugin has no async check(request, client)")


def gates_for(config: Config) -> list[RequestGate]:
    """The gates ``config`` asks for, each plugin made once: --allow-origin first
    (cheapest), then each --auth-plugin."""
    gates: list[RequestGate] = []
    if config.allow_origins:
        gates.append(OriginAllowlist(" ".join(config.allow_origins)))
    for spec in config.auth:
        gate = load_auth_plugin(spec.plugin, spec.source)
        if isinstance(gate, ClientCertNames) and (config.tls is None or not config.tls.cafile):
            raise ConfigError(
                "ClientCertCNAuth needs --cert and --cafile (to verify client certificates)"
            )
        gates.append(gate)
    return gates
