"""Plugin names -> plugin objects, for ``--token-plugin`` and ``--auth-plugin``.

websockify's class names work as they are (``TokenFile``, or the full
``websockify.token_plugins.TokenFile``), short names too (``file``), and any other
dotted name (``package.module.Class`` or ``package.module:Class``) is imported and
called with the ``--*-source`` string: that is how operators plug in their own.

Built-in plugins that need an optional library (PyJWT, hiredis) import it only when
chosen, so a bridge that does not use them does not need them installed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ..addresses import Address, TcpAddress, UnixAddress
from ..errors import ConfigError
from .base import PluginAnswerError, TokenPlugin

TOKEN_PLUGINS = {
    "TokenFile": "trio_bridge.tokens.files:TokenFile",
    "ReadOnlyTokenFile": "trio_bridge.tokens.files:ReadOnlyTokenFile",
    "TokenFileName": "trio_bridge.tokens.files:TokenFileName",
    "TokenRedis": "trio_bridge.tokens.redis_store:RedisTokens",
    "JWTTokenApi": "trio_bridge.tokens.jwt_tokens:JwtTokens",
    "UnixDomainSocketDirectory": "trio_bridge.tokens.unixdir:UnixSocketDirectory",
    "BaseTokenAPI": "trio_bridge.tokens.http_api:TokenApi",
    "JSONTokenApi": "trio_bridge.tokens.http_api:JsonTokenApi",
}
TOKEN_SHORT_NAMES = {
    "file": "TokenFile",
    "file-readonly": "ReadOnlyTokenFile",
    "file-name": "TokenFileName",
    "redis": "TokenRedis",
    "jwt": "JWTTokenApi",
    "unix-directory": "UnixDomainSocketDirectory",
    "api": "BaseTokenAPI",
    "json-api": "JSONTokenApi",
}
EXTRAS = {"jwt": "jwt", "cryptography": "jwt", "hiredis": "redis"}


def load_plugin_class(
    name: str,
    builtins: Mapping[str, str],
    short_names: Mapping[str, str],
    websockify_module: str,
    flag: str,
) -> Any:
    """The class ``name`` designates; :class:`ConfigError` with the choices when none."""
    base = name.removeprefix(websockify_module + ".")
    base = short_names.get(base, base)
    if base in builtins:
        spec = builtins[base]
    elif "." in name or ":" in name:
        spec = name if ":" in name else ":".join(name.rsplit(".", 1))
    else:
        choices = ", ".join([*builtins, *short_names])
        raise ConfigError(f"{flag}: unknown plugin {name!r}; built in: {choices}")
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        hint = f": pip install 'trio-bridge[{extra}]'" if extra else ""
        raise ConfigError(f"{flag} {name}: cannot import {exc.name or module_name}{hint}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"{flag}: module {module_name} has no {class_name}") from None


def load_plugin(
    name: str,
    source: str | None,
    builtins: Mapping[str, str],
    short_names: Mapping[str, str],
    websockify_module: str,
    flag: str,
    **options: str,
) -> Any:
    """An instance of the plugin ``name`` made from ``source``, as websockify makes them
    (built-in plugins may take keyword ``options`` too); any failure is a
    :class:`ConfigError` naming the flag and the plugin."""
    cls = load_plugin_class(name, builtins, short_names, websockify_module, flag)
    try:
        return cls(source, **options)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{flag} {name}: {exc}") from None


class BlockingTokenPlugin:
    """Adapts a websockify-style plugin: a blocking ``lookup(token)`` returning
    ``[host, port]``, ``["unix_socket", path]`` or None. It runs in a worker thread."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def __str__(self) -> str:
        return type(self.plugin).__name__

    async def lookup(self, token: str) -> Address | None:
        result = await trio.to_thread.run_sync(self.plugin.lookup, token)
        if result is None:
            return None
        # Errors name types only: the values may hold the token or a secret.
        if not isinstance(result, Sequence) or isinstance(result, str | bytes) or len(result) != 2:
            raise PluginAnswerError(
                f"returned a {type(result).__qualname__}, not [host, port] or None"
            )
        host, port = result
        if not isinstance(host, str):
            raise PluginAnswerError(
                f"returned a [{type(host).__qualname__}, ...], not [host, port]"
            )
        if host == "unix_socket":
            return UnixAddress(str(port))
        try:
            port = int(port.decode() if isinstance(port, bytes) else port)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise PluginAnswerError(
                "returned [host, port] with a port that is not a number"
            ) from None
        return TcpAddress(host, port)

    def reload(self) -> None:
        reload = getattr(self.plugin, "reload", None)
        if callable(reload):
            reload()


def builtin_name(name: str) -> str | None:
    """The websockify class name of the built-in token plugin ``name`` designates."""
    base = name.removeprefix("websockify.token_plugins.")
    base = TOKEN_SHORT_NAMES.get(base, base)
    return base if base in TOKEN_PLUGINS else None


def load_token_plugin(
    name: str, source: str | None, *, jwt_audience: str | None = None, jwt_issuer: str | None = None
) -> TokenPlugin:
    """The token plugin ``name`` made from ``source``; ``jwt_audience`` and ``jwt_issuer``
    are for JWTTokenApi only (--jwt-audience, --jwt-issuer)."""
    claims = {"audience": jwt_audience, "issuer": jwt_issuer}
    options = {key: value for key, value in claims.items() if value is not None}
    if options and builtin_name(name) != "JWTTokenApi":
        raise ConfigError("--jwt-audience and --jwt-issuer: only with --token-plugin JWTTokenApi")
    plugin = load_plugin(
        name,
        source,
        TOKEN_PLUGINS,
        TOKEN_SHORT_NAMES,
        "websockify.token_plugins",
        "--token-plugin",
        **options,
    )
    lookup = getattr(plugin, "lookup", None)
    if not callable(lookup):
        raise ConfigError(f"--token-plugin {name}: the plugin has no lookup(token) method")
    if inspect.iscoroutinefunction(lookup):
        result: TokenPlugin = plugin
        return result
    return BlockingTokenPlugin(plugin)
