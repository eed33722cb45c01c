"""Shared fixtures: real TCP targets and an in-process bridge on kernel-chosen 127.0.0.1 ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import trio

from trio_bridge import Bridge, Config, Limits, TcpAddress
from trio_bridge.config import Address

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class TcpTarget:
    """A TCP server on 127.0.0.1 running ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.address = TcpAddress("127.0.0.1", 0)
        self.accepted = 0
        self.closed = 0
        self.closed_event = trio.Event()

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await self.handler(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()
            self.closed += 1
            self.closed_event.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[TcpTarget] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.address = TcpAddress("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._serve_one, listeners)
            task_status.started(self)


async def echo(stream: trio.SocketStream) -> None:
    async for chunk in stream:
        await stream.send_all(chunk)


@pytest.fixture
async def start_target(nursery: trio.Nursery) -> Callable[[Handler], Awaitable[TcpTarget]]:
    async def start(handler: Handler) -> TcpTarget:
        target: TcpTarget = await nursery.start(TcpTarget(handler).serve)
        return target

    return start


@pytest.fixture
async def echo_target(start_target: Callable[[Handler], Awaitable[TcpTarget]]) -> TcpTarget:
    return await start_target(echo)


def loopback_listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


class RunningBridge:
    def __init__(self, bridge: Bridge, port: int) -> None:
        self.bridge = bridge
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/"


BridgeStarter = Callable[..., Awaitable[RunningBridge]]


@pytest.fixture
async def start_bridge(nursery: trio.Nursery) -> BridgeStarter:
    """``await start_bridge(target, **limits_or_config_fields)`` -> a bridge on a free port."""

    async def start(target: Address, **options: Any) -> RunningBridge:
        limit_fields = set(Limits.__dataclass_fields__)
        limits = replace(Limits(), **{k: v for k, v in options.items() if k in limit_fields})
        rest = {k: v for k, v in options.items() if k not in limit_fields}
        config = Config(target=target, limits=limits, **rest)
        listener = loopback_listener()
        port = listener.getsockname()[1]
        bridge: Bridge = await nursery.start(Bridge(config).serve, [listener])
        return RunningBridge(bridge, port)

    return start


@pytest.fixture
async def bridge(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> AsyncIterator[RunningBridge]:
    yield await start_bridge(echo_target.address)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
