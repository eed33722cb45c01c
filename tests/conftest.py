"""Shared fixtures: real TCP targets and an in-process bridge on kernel-chosen 127.0.0.1 ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from trio_bridge import TcpAddress
from trio_bridge.pytest_plugin import RunningBridge as RunningBridge  # tests import it from here
from trio_bridge.pytest_plugin import StartBridge

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


StartTarget = Callable[[Handler], Awaitable[TcpTarget]]
# Relay tests that must hold on both downstream paths.
ZERO_COPY = pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "framed"])


@pytest.fixture
async def start_target(nursery: trio.Nursery) -> StartTarget:
    async def start(handler: Handler) -> TcpTarget:
        target: TcpTarget = await nursery.start(TcpTarget(handler).serve)
        return target

    return start


@pytest.fixture
async def echo_target(start_target: StartTarget) -> TcpTarget:
    return await start_target(echo)


def loopback_listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


# The bridge fixtures are the pytest plugin's (trio_bridge.pytest_plugin): the project's
# tests use what it offers client authors, under the names they have always had here.
BridgeStarter = StartBridge


@pytest.fixture
def start_bridge(start_ws_bridge: StartBridge) -> StartBridge:
    """``await start_bridge(target, **limits_or_config_fields)`` -> a bridge on a free port."""
    return start_ws_bridge


@pytest.fixture
async def bridge(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> AsyncIterator[RunningBridge]:
    yield await start_bridge(echo_target.address)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- Hand-driven clients and log waiting (bad input, close paths) -------------------------
# Imports here rather than at the top keep this block a pure append to the file.

import logging  # noqa: E402
from collections.abc import AsyncGenerator, Iterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402

from websockets.client import ClientProtocol  # noqa: E402
from websockets.frames import Close, Frame, Opcode  # noqa: E402
from websockets.http11 import Response  # noqa: E402
from websockets.protocol import State  # noqa: E402
from websockets.trio.client import ClientConnection, connect  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402
from websockets.uri import parse_uri  # noqa: E402

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key
ANY_URI = parse_uri("ws://127.0.0.1/")  # protocols that only parse never use it


def ws_request(path: str = "/", **headers: str | None) -> bytes:
    """A WebSocket opening request; keyword headers (``Sec_WebSocket_Key=``) override or,
    with ``None``, remove the defaults."""
    fields: dict[str, str | None] = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": WS_KEY,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "binary",
    }
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: Opcode, data: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=mask, extensions=[])


class RawClient:
    """A real TCP client sending bytes we choose; what the server sends back is parsed with
    websockets' sans-I/O client protocol, never assumed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()  # received, not yet parsed
        self.eof = False
        self.reset = False
        # Server frames, parsed by a protocol that starts past the handshake: the handshake
        # request is ours, hand-made, and the protocol only checks requests it made itself.
        self.frames = ClientProtocol(ANY_URI, state=State.OPEN, max_size=None)
        host, port = stream.socket.getsockname()[:2]
        self.local_address = f"{host}:{port}"  # as the bridge logs the client

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _receive(self) -> None:
        if self.eof:
            raise EOFError("the server closed the connection")
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            self.reset, data = True, b""
        self.eof = not data
        self.buffer += data

    async def _next_event(self, protocol: ClientProtocol) -> object:
        """The protocol's next event. It gets one byte at a time so that the bytes after the
        event stay in the buffer: the protocol would discard them after a response or a
        close, and the tests check them."""
        while True:
            if not self.buffer:
                await self._receive()
            if not self.buffer:
                protocol.receive_eof()  # a response may last until EOF
            else:
                protocol.receive_data(self.buffer[:1])
                del self.buffer[:1]
            if events := protocol.events_received():
                return events[0]
            if protocol.close_expected() or (self.eof and not self.buffer):  # failed or cut short
                protocol.receive_eof()
                raise protocol.handshake_exc or protocol.close_exc

    async def read_response(self) -> Response:
        # A fresh protocol per response, its handshake checks ignored (it did not make our
        # request): the tests judge the status and headers themselves.
        response = await self._next_event(ClientProtocol(ANY_URI))
        assert isinstance(response, Response), response
        return response

    async def handshake(self, path: str = "/") -> None:
        await self.send(ws_request(path))
        response = await self.read_response()
        assert response.status_code == 101, response

    async def read_frame(self) -> Frame:
        frame = await self._next_event(self.frames)
        assert isinstance(frame, Frame), frame
        return frame

    async def read_close(self) -> Close:
        """Read the server's frames up to its close frame and decode the close payload."""
        while (await self.read_frame()).opcode is not Opcode.CLOSE:
            pass
        self.frames.receive_eof()  # it parses nothing after a close: let it report the close
        close = self.frames.close_exc.rcvd
        assert close is not None
        return close

    async def read_to_eof(self) -> bytes:
        """Everything the server sends until it closes (FIN or reset), unparsed."""
        while not self.eof:
            await self._receive()
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

    async def aclose(self) -> None:
        await self.stream.aclose()


async def check_echo(ws: ClientConnection, payload: bytes) -> None:
    """Send one message and read back the echo (which may arrive in several messages)."""
    await ws.send(payload)
    echoed = b""
    while len(echoed) < len(payload):
        data = await ws.recv()
        assert isinstance(data, bytes)
        echoed += data
    assert echoed == payload


@asynccontextmanager
async def healthy_session(url: str) -> AsyncGenerator[ClientConnection]:
    """A session opened before the test body and checked to still relay after it."""
    async with connect(url, subprotocols=[Subprotocol("binary")]) as ws:
        await check_echo(ws, b"healthy before")
        yield ws
        await check_echo(ws, b"healthy after")


class LogWaiter(logging.Handler):
    """Lets a test await a log record; the records themselves are caplog's."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        super().__init__(logging.DEBUG)
        self.caplog = caplog
        self._new_record = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self._new_record.set()

    async def wait_for(
        self, *fragments: str, logger: str = "trio_bridge", count: int = 1
    ) -> logging.LogRecord:
        """The ``count``-th record from ``logger`` (or a child) whose message has every fragment."""
        while True:
            found = [
                record
                for record in self.caplog.records
                if (record.name == logger or record.name.startswith(logger + "."))
                and all(f in record.getMessage() for f in fragments)
            ]
            if len(found) >= count:
                return found[count - 1]
            self._new_record = trio.Event()
            await self._new_record.wait()


@pytest.fixture
def bridge_log(caplog: pytest.LogCaptureFixture) -> Iterator[LogWaiter]:
    caplog.set_level(logging.INFO, logger="trio_bridge")
    waiter = LogWaiter(caplog)
    logger = logging.getLogger("trio_bridge")
    logger.addHandler(waiter)
    yield waiter
    logger.removeHandler(waiter)
