"""Helpers for the TLS, token, auth, abuse and fuzz tests: certificates made in the test,
raw HTTP exchanges from chosen source addresses, Unix and TLS echo targets, and a real
redis-server in a temporary folder."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
import trustme
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from trio_bridge.config import TcpAddress, TlsSettings

from .conftest import TcpTarget, echo


class Pki:
    """A CA and a server certificate for 127.0.0.1/localhost, written to ``folder``."""

    def __init__(self, folder: Path, ca: trustme.CA | None = None) -> None:
        self.folder = folder
        self.ca = ca or trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_file = folder / "server.pem"
        self.write_server(self.ca.issue_cert("127.0.0.1", "localhost"))

    def write_server(self, leaf: trustme.LeafCert) -> None:
        leaf.private_key_and_cert_chain_pem.write_to_path(str(self.server_file))

    def expired(self, *identities: str) -> trustme.LeafCert:
        now = datetime.datetime.now(datetime.UTC)
        return self.ca.issue_cert(
            *identities,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def client_context(
        self, *, trust: trustme.CA | None = None, cert: trustme.LeafCert | None = None
    ) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (trust or self.ca).configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context

    def settings(self, **options: object) -> TlsSettings:
        return TlsSettings(cert=str(self.server_file), **options)  # type: ignore[arg-type]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)


async def open_from(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the bridge from ``source`` (any 127.0.0.0/8 address works)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_all(stream: trio.abc.Stream) -> tuple[bytes, bool]:
    """Everything until EOF, and whether the connection ended with a reset."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(data), True
        if not chunk:
            return bytes(data), False
        data += chunk


def parse_response(data: bytes) -> Response:
    """The first HTTP response in ``data``, parsed by websockets (raises if malformed)."""
    # Its handshake checks fail (it did not make the request) and are not ours to judge.
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    protocol.receive_data(data)
    protocol.receive_eof()
    for response in protocol.events_received():
        assert isinstance(response, Response)
        return response
    raise AssertionError(f"no HTTP response in {data[:200]!r}") from protocol.handshake_exc


async def exchange(port: int, request: bytes, *, source: str = "127.0.0.1") -> Response:
    """Send one request, read to EOF, return the parsed response."""
    stream = await open_from(port, source)
    async with stream:
        await stream.send_all(request)
        data, _ = await read_all(stream)
    return parse_response(data)


@asynccontextmanager
async def tls_echo_target(pki: Pki) -> AsyncIterator[TcpTarget]:
    """An echo server that speaks TLS with ``pki``'s server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_file))
    target = TcpTarget(echo)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(
            0, context, host="127.0.0.1", https_compatible=True
        )
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        port = transport.socket.getsockname()[1]
        target.address = TcpAddress("127.0.0.1", port)

        async def serve_one(stream: trio.SSLStream[trio.SocketStream]) -> None:
            target.accepted += 1
            try:
                async for chunk in stream:
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass
            finally:
                await trio.aclose_forcefully(stream)

        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        yield target
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def unix_echo(path: Path) -> AsyncIterator[list[int]]:
    """An echo server on a Unix socket; the list counts accepted connections."""
    accepted = [0]
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        accepted[0] += 1
        with suppress(trio.BrokenResourceError):
            await echo(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve_one, [listener])
        yield accepted
        nursery.cancel_scope.cancel()


class RedisServer:
    """A real redis-server on a Unix socket and a TCP port, in its own folder."""

    def __init__(self, folder: Path, port: int, password: str | None) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.port = port
        self.password = password
        self.process: trio.Process | None = None

    def arguments(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: ./dev test installs it (apt)")
        arguments = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.password:
            arguments += ["--requirepass", self.password]
        return arguments

    async def start(self, nursery: trio.Nursery) -> None:
        """Start and return once redis logs that it accepts connections."""
        process = await trio.lowlevel.open_process(
            self.arguments(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.process = process
        assert process.stdout is not None
        output = bytearray()
        async for chunk in process.stdout:
            output += chunk
            if b"Ready to accept connections" in output:
                break
        else:
            raise AssertionError(f"redis-server did not start: {output.decode()}")
        nursery.start_soon(self._drain, process.stdout)

    @staticmethod
    async def _drain(stdout: trio.abc.ReceiveStream) -> None:
        async for _ in stdout:
            pass

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@asynccontextmanager
async def redis_server(
    folder: Path, port: int, password: str | None = None
) -> AsyncIterator[RedisServer]:
    await trio.Path(folder).mkdir(exist_ok=True)
    server = RedisServer(folder, port, password)
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()
            nursery.cancel_scope.cancel()


def raise_fd_limit(wanted: int) -> None:
    """The hostile-flood test holds both ends of its connections in this process."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} file descriptors; the hard limit is {hard}")


def chmod_private(path: Path) -> Path:
    os.chmod(path, 0o600)
    return path
