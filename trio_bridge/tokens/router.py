"""Token routing: the :class:`~trio_bridge.routing.TargetResolver` for one bridge, many targets.

Per request: take the token from where the operator said (``?token=``, the last path
segment, or the Host header), check its shape, ask the plugin, check the answer
against ``--allow-target``. Every refusal happens before any connection attempt:

- no token, a malformed one, or one the plugin does not know -> 404;
- a token the plugin rejects (expired or badly signed JWT) -> 403;
- a target outside ``--allow-target`` -> 403 (the target goes to the log only);
- a target no connection can be made to (an invalid host name), or a token API
  answer that names none -> 502;
- a token store that cannot answer -> 503, logged once a minute per reason (then a
  count): every client of a bridge whose store is down meets the same failure;
- a plugin that fails or answers something other than a target (a plugin bug) -> 500.

A token is a password for its target: no log line here holds one (tokens are logged
as :func:`~.base.describe_token` fingerprints), and :meth:`TokenRouter.redact_path`
is how the server writes request paths to logs and recordings.
"""

from __future__ import annotations

import logging
import urllib.parse

from websockets.http11 import Request

from ..addresses import Address, TcpAddress, UnixAddress
from ..config import Config
from ..errors import ConfigError
from ..logs import RateLimitedLog
from ..request_target import redact, split_target
from ..routing import HttpRefusal, StaticTarget, TargetResolver
from .allow import TargetAllowlist
from .base import (
    PluginAnswerError,
    TokenPlugin,
    TokenStoreError,
    UnusableTarget,
    check_target,
    describe_failure,
    describe_token,
    token_is_well_formed,
)
from .registry import BlockingTokenPlugin, load_token_plugin

log = logging.getLogger("trio_bridge.tokens")

INTERNAL_ERROR, BAD_GATEWAY = 500, 502
NOT_FOUND, FORBIDDEN, UNAVAILABLE = 404, 403, 503
MAX_QUERY_FIELDS = 64


def _refuse(status: int, reason: str) -> HttpRefusal:
    return HttpRefusal(status, reason)


def _from_query(request: Request) -> str | None:
    query = split_target(request.path)[1]
    try:
        values = urllib.parse.parse_qs(query, max_num_fields=MAX_QUERY_FIELDS).get("token", [])
    except ValueError:
        raise _refuse(NOT_FOUND, "Malformed token") from None
    if len(values) > 1:
        raise _refuse(NOT_FOUND, "Malformed token: more than one")
    return values[0].rstrip("\n") if values else None


def _from_path(request: Request) -> str | None:
    path = split_target(request.path)[0]
    segments = [segment for segment in path.split("/") if segment]
    return urllib.parse.unquote(segments[-1]) if segments else None


def _from_host(request: Request) -> str | None:
    hosts = request.headers.get_all("Host")
    if len(hosts) != 1:
        return None
    host = hosts[0].strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0] or None


EXTRACTORS = {"query": _from_query, "path": _from_path, "host": _from_host}


def extract_token(request: Request, token_from: str) -> str:
    """The request's token, or :class:`HttpRefusal` 404 when it has none or a malformed one."""
    token = EXTRACTORS[token_from](request)
    if token is None or token == "":
        where = {"query": "?token=", "path": "the URL path", "host": "the Host header"}
        raise _refuse(NOT_FOUND, f"No token in the request (expected in {where[token_from]})")
    if not token_is_well_formed(token):
        raise _refuse(NOT_FOUND, "Malformed token")
    return token


class TokenRouter:
    """Resolves a request to the target its token stands for (see the module docs)."""

    def __init__(
        self, plugin: TokenPlugin, token_from: str = "query", allow: TargetAllowlist | None = None
    ) -> None:
        self.plugin = plugin
        self.token_from = token_from
        self.allow = allow or TargetAllowlist(())
        self._store_log = RateLimitedLog(
            log,
            lambda key, n, s: f"{n} more token lookups failed ({key}) in the last {s:g} s",
            level=logging.ERROR,
        )

    def __str__(self) -> str:
        plugin = self.plugin
        if type(plugin).__str__ is object.__str__:
            source = getattr(plugin, "source", None)
            described = type(plugin).__name__ + (f" {source}" if source else "")
        else:
            described = str(plugin)
        return f"the targets of tokens from {described}"

    def reload(self) -> None:
        reload = getattr(self.plugin, "reload", None)
        if callable(reload):
            reload()

    def redact_path(self, path: str) -> str:
        """``path`` for logs and recordings (:func:`~trio_bridge.request_target.redact`); under
        ``--token-from path`` the last path segment is the token."""
        return redact(path, path_token=self.token_from == "path")

    def plugin_name(self) -> str:
        """The plugin's class, as its author knows it (a websockify one, unwrapped)."""
        plugin = self.plugin.plugin if isinstance(self.plugin, BlockingTokenPlugin) else self.plugin
        return f"{type(plugin).__module__}.{type(plugin).__qualname__}"

    async def resolve(self, request: Request, client: str) -> Address:
        token = extract_token(request, self.token_from)
        try:
            answer: object = await self.plugin.lookup(token)
            if answer is None:
                raise _refuse(NOT_FOUND, "Unknown token")
            if not isinstance(answer, TcpAddress | UnixAddress):
                kind = type(answer).__qualname__
                raise PluginAnswerError(f"returned a {kind}, not a TcpAddress, UnixAddress or None")
            target = check_target(answer)
        except HttpRefusal:
            raise
        except TokenStoreError as exc:
            # Keyed by the store's message, which names no client and no token.
            self._store_log.log(str(exc), "client %s: token lookup failed: %s", client, exc)
            raise _refuse(UNAVAILABLE, "Token store unavailable, try again later") from None
        except UnusableTarget as exc:
            log.error(
                "client %s: token %s names an unusable target: %s",
                client,
                describe_token(token),
                exc,
            )
            raise _refuse(BAD_GATEWAY, "The token names an unusable target") from None
        except Exception as exc:
            # A wrong answer says what it was; an exception only its type and place (its
            # message may quote the token).
            what = (
                str(exc)
                if isinstance(exc, PluginAnswerError)
                else f"raised {describe_failure(exc)}"
            )
            log.error("client %s: token plugin %s %s", client, self.plugin_name(), what)
            raise _refuse(INTERNAL_ERROR, "Internal error while looking the token up") from None
        if not self.allow.allows(target):
            log.warning(
                "client %s: token %s names target %s, which no --allow-target pattern allows",
                client,
                describe_token(token),
                target,
            )
            raise _refuse(FORBIDDEN, "Target not allowed")
        return target


def resolver_for(config: Config) -> TargetResolver | None:
    """The resolver ``config`` describes, its plugin made once; None when it names
    neither a target nor tokens."""
    allow = TargetAllowlist(config.allow_targets)
    if config.target is not None and not allow.allows(config.target):
        raise ConfigError(f"target {config.target} is not allowed by any --allow-target pattern")
    if config.tokens is not None:
        tokens = config.tokens
        plugin = load_token_plugin(
            tokens.plugin,
            tokens.source,
            jwt_audience=tokens.jwt_audience,
            jwt_issuer=tokens.jwt_issuer,
        )
        return TokenRouter(plugin, tokens.token_from, allow)
    if config.target is not None:
        return StaticTarget(config.target)
    return None
