"""websockify's TokenRedis: tokens in a Redis store shared by several bridges.

``--token-source`` keeps websockify's syntax, ``host[:port[:db[:password[:namespace]]]]``,
with ``"..."`` around a field that contains colons; a host starting with ``/`` is a
Unix socket path (then leave the port empty). The value under ``namespace:token`` is
``host:port`` or JSON ``{"host": "host:port"}``, as websockify expects.

Lookups reuse a few idle connections and are bounded in time; when Redis cannot
answer, the client gets 503 (the token may be fine) and the log the reason.
"""

from __future__ import annotations

import json
import logging
import re

import trio

from ..addresses import Address, TcpAddress, UnixAddress
from ..errors import ConfigError
from .base import TokenStoreError, describe_token, parse_target, require_source
from .resp import RedisConnection, RedisError

log = logging.getLogger("trio_bridge.tokens")

DEFAULT_PORT = 6379
LOOKUP_TIMEOUT = 5.0
MAX_IDLE = 4
SHAPE = "host[:port[:db[:password[:namespace]]]]"
FIELD = re.compile(r'"([^"]*)"|([^:]*)')


def split_source(source: str) -> list[str]:
    """``a:"b:c":d`` -> ``['a', 'b:c', 'd']`` (websockify's parse_source_args)."""
    fields: list[str] = []
    position = 0
    while True:
        match = FIELD.match(source, position)
        assert match is not None  # the second branch matches the empty string
        fields.append(match[1] if match[1] is not None else match[2])
        position = match.end()
        if position >= len(source):
            return fields
        if source[position] != ":":
            raise ConfigError(f"--token-source {source!r}: stray text after a quoted field")
        position += 1
        if position == len(source):
            fields.append("")
            return fields


class RedisTokens:
    def __init__(self, source: str | None) -> None:
        text = require_source("TokenRedis", source, SHAPE)
        fields = split_source(text)
        if len(fields) > 5:
            raise ConfigError(f"--token-source {text!r}: expected {SHAPE}")
        host, port, db, password, namespace = (fields + [""] * 5)[:5]
        if not host:
            raise ConfigError(f"--token-source {text!r}: no Redis host")
        try:
            self.db = int(db or 0)
            port_number = int(port or DEFAULT_PORT)
        except ValueError:
            raise ConfigError(f"--token-source {text!r}: port and db must be numbers") from None
        self.address: Address = (
            UnixAddress(host) if host.startswith("/") else TcpAddress(host, port_number)
        )
        self.password = password or None
        self.namespace = f"{namespace}:" if namespace else ""
        self._idle: list[RedisConnection] = []

    def __str__(self) -> str:
        return f"Redis at {self.address}"

    async def _connect(self) -> RedisConnection:
        connection = await RedisConnection.open(self.address)
        try:
            if self.password is not None:
                await connection.call("AUTH", self.password)
            if self.db:
                await connection.call("SELECT", self.db)
        except BaseException:
            await connection.aclose()
            raise
        return connection

    async def _get(self, key: str) -> bytes | None:
        # An idle connection may have died with a Redis restart: one retry on a new one.
        for attempt in (1, 2):
            reused = bool(self._idle)
            connection = self._idle.pop() if reused else await self._connect()
            try:
                value = await connection.call("GET", key)
            except (OSError, trio.BrokenResourceError) as exc:
                await connection.aclose()
                if reused and attempt == 1:
                    continue
                raise TokenStoreError(f"Redis at {self.address}: {exc}") from exc
            except BaseException:
                await connection.aclose()
                raise
            if len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
            else:
                await connection.aclose()
            return value if isinstance(value, bytes) or value is None else None
        raise AssertionError("unreachable")

    async def lookup(self, token: str) -> Address | None:
        try:
            with trio.fail_after(LOOKUP_TIMEOUT):
                value = await self._get(self.namespace + token)
        except trio.TooSlowError:
            raise TokenStoreError(
                f"Redis at {self.address}: no answer within {LOOKUP_TIMEOUT:g} s"
            ) from None
        except (OSError, RedisError) as exc:
            raise TokenStoreError(f"Redis at {self.address}: {exc}") from exc
        if value is None:
            return None
        return self._parse(value, token)

    def _parse(self, value: bytes, token: str) -> Address | None:
        """The target in a token's value; None, logged, when there is none. The log line
        says what is wrong, never the value: a key that is not a token may hold a secret."""
        text = value.decode("utf-8", "replace").strip()
        problem = "not host:port, [v6]:port or unix:/path with a valid host name"
        try:
            if text.startswith("{"):
                problem = 'JSON, but not {"host": "host:port"} with a valid host name'
                host = json.loads(text).get("host")
                if not isinstance(host, str):
                    raise ConfigError("no host")
                text = host
            return parse_target(text, "")
        except (ConfigError, ValueError, AttributeError):
            log.error(
                "Redis at %s: unusable value for token %s (%d bytes): %s",
                self.address,
                describe_token(token),
                len(value),
                problem,
            )
            return None

    def reload(self) -> None:
        """Drop idle connections so the next lookup reconnects (e.g. after a failover)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
