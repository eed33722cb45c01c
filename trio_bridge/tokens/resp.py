"""A minimal Redis client on Trio streams: commands out, replies in, nothing else.

Why not a library client: ``redis`` (redis-py) is asyncio or threads, not Trio, and
the Trio clients on PyPI (``redtrio``, ``redio``) have not been released since 2022.
Parsing replies is the part worth not writing: ``hiredis`` is Redis' own C parser,
sans-I/O (feed bytes, take replies), the same design as websockets' protocol objects
used by the bridge. Encoding a command is five lines of RESP (length-prefixed, so
binary-safe: a token can never inject a second command).
"""

from __future__ import annotations

from typing import Any

import hiredis
import trio

from ..addresses import Address, TcpAddress

Arg = str | bytes | int


class RedisError(Exception):
    """Redis answered with an error reply (``-ERR ...``, ``-WRONGPASS ...``)."""


def encode_command(args: tuple[Arg, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisConnection:
    """One connection; not safe for concurrent commands (the pool hands it to one task)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader()

    @classmethod
    async def open(cls, address: Address) -> RedisConnection:
        stream: trio.SocketStream
        if isinstance(address, TcpAddress):
            stream = await trio.open_tcp_stream(address.host, address.port)
        else:
            stream = await trio.open_unix_socket(address.path)
        return cls(stream)

    async def call(self, *args: Arg) -> Any:
        await self.stream.send_all(encode_command(args))
        try:
            while (reply := self.reader.gets()) is False:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionResetError("Redis closed the connection")
                self.reader.feed(data)
        except hiredis.ProtocolError as exc:
            raise RedisError(f"not a Redis reply: {exc}") from None
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def close(self) -> None:
        """Close without awaiting, for synchronous callers (reload)."""
        self.stream.socket.close()
