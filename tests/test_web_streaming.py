"""Files are streamed from the open file, never held in memory, through real sockets.

A big file (32 MiB of random bytes) is fetched over plain TCP (sendfile(2)) and over TLS
(64 KiB chunks); readers that pause, stop or leave show that the bridge's memory does not
grow with the file, that a reader taking nothing is cut off after the timeout, and that
the file's descriptor is closed on every path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_bridge.addons import Addons
from trio_bridge.config import Limits
from trio_bridge.server import Bridge

from .conftest import LogWaiter, loopback_listener
from .security_support import Pki, pki
from .test_web import StartCli, fetch, service_config, start_cli

__all__ = ["pki", "start_cli"]

SIZE = 32 << 20
STALL = 1.0  # the bridge's handshake timeout in these tests: how long a stalled reader lasts


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(SIZE))
    (folder / "small.txt").write_bytes(b"small\n")
    return folder


def held_open(path: Path) -> int:
    """How many descriptors of this process refer to ``path`` (the in-process bridge's)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


StartFiles = Callable[..., Awaitable[int]]


@pytest.fixture
async def start_files(nursery: trio.Nursery, root: Path) -> StartFiles:
    """``await start_files(**config_fields)``: an in-process ``--web --file-only`` bridge's
    port, built as the command line builds it."""

    async def start(**fields: Any) -> int:
        fields.setdefault("limits", Limits(handshake_timeout=STALL, close_timeout=0.5))
        addons = Addons(service_config(target=None, web=root, file_only=True, **fields))
        listener = loopback_listener()
        await nursery.start(addons.serve, [listener])
        return int(listener.getsockname()[1])

    return start


async def open_client(port: int, pki: Pki | None) -> trio.abc.Stream:
    """A client with a small receive buffer (so the kernel holds little on its behalf),
    over TLS when ``pki`` is given."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if pki is not None:
        tls = trio.SSLStream(
            stream, pki.client_context(), server_hostname="127.0.0.1", https_compatible=True
        )
        await tls.do_handshake()
        stream = tls
    return stream


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The header block and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def read_rest(stream: trio.abc.Stream, digest: Any) -> int:
    """Read to the end of the connection, hashing; how many bytes came."""
    count = 0
    try:
        while chunk := await stream.receive_some(1 << 20):
            digest.update(chunk)
            count += len(chunk)
    except trio.BrokenResourceError:
        pass  # a reset after the bridge gave up on this reader
    return count


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_big_file_arrives_byte_for_byte(
    start_files: StartFiles, root: Path, pki: Pki, tls: bool
) -> None:
    port = await start_files(tls=pki.settings() if tls else None)
    with trio.fail_after(30):
        stream = await open_client(port, pki if tls else None)
        await stream.send_all(get("/big.bin"))
        head, first = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"\r\nContent-Length: {SIZE}\r\n".encode() in head
        digest = hashlib.sha256(first)
        assert len(first) + await read_rest(stream, digest) == SIZE
        assert digest.digest() == hashlib.sha256((root / "big.bin").read_bytes()).digest()
        await stream.aclose()
    assert held_open(root / "big.bin") == 0


async def test_head_and_304_of_a_big_file_send_no_body(start_files: StartFiles, root: Path) -> None:
    port = await start_files()
    head = await fetch(port, "/big.bin", method="HEAD")
    assert (head.status, head.headers["Content-Length"], head.body) == (200, str(SIZE), b"")
    same = await fetch(port, "/big.bin", If_None_Match=head.headers["ETag"])
    assert (same.status, same.body) == (304, b"")
    assert held_open(root / "big.bin") == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("reader", ["stops", "leaves"])
async def test_a_reader_that_stops_or_leaves_is_let_go_and_the_file_closed(
    start_files: StartFiles, root: Path, pki: Pki, bridge_log: LogWaiter, tls: bool, reader: str
) -> None:
    port = await start_files(tls=pki.settings() if tls else None)
    big = root / "big.bin"
    with trio.fail_after(30):
        stream = await open_client(port, pki if tls else None)
        await stream.send_all(get("/big.bin"))
        head, _ = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert held_open(big) == 1  # the transfer is under way, from the open file
        if reader == "leaves":
            await trio.aclose_forcefully(stream)
            cause = "the client went away"
        else:
            cause = f"the client took no data for {STALL:g} s"
        record = await bridge_log.wait_for("GET /big.bin -> 200, cut short after", cause)
        assert f" of {SIZE} bytes: " in record.getMessage()
        assert held_open(big) == 0
        if reader == "stops":
            # The connection ends before the body does: the client can tell.
            assert await read_rest(stream, hashlib.sha256()) < SIZE
            await stream.aclose()


async def test_shutdown_closes_the_file_of_a_transfer_in_progress(
    nursery: trio.Nursery, root: Path
) -> None:
    limits = Limits(handshake_timeout=60, close_timeout=0.5, shutdown_grace=0.2)
    addons = Addons(service_config(target=None, web=root, file_only=True, limits=limits))
    listener = loopback_listener()
    port = listener.getsockname()[1]
    bridge: Bridge = addons.bridge
    with trio.fail_after(30):
        async with trio.open_nursery() as serving:
            await serving.start(addons.serve, [listener])
            stream = await open_client(port, None)
            await stream.send_all(get("/big.bin"))
            await read_head(stream)
            assert held_open(root / "big.bin") == 1
            bridge.request_shutdown()  # the reader never reads again: cancelled after the grace
        assert held_open(root / "big.bin") == 0
        await stream.aclose()


async def test_slow_readers_of_a_big_file_do_not_grow_the_bridge(
    start_cli: StartCli, root: Path
) -> None:
    """Four readers fetch 32 MiB and pause after the first bytes: the bridge process (the
    real command line) grows by far less than one copy of the file, and each reader then
    gets the whole file."""
    bridge = await start_cli("--web", str(root), "--file-only")
    with trio.fail_after(60):
        assert (await fetch(bridge.port, "/small.txt")).body == b"small\n"  # warm
        before = bridge.rss()
        readers = []
        for _ in range(4):
            stream = await open_client(bridge.port, None)
            await stream.send_all(get("/big.bin"))
            head, first = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            readers.append((stream, hashlib.sha256(first), len(first)))
        grown = bridge.rss() - before
        assert grown < SIZE // 4, f"the bridge grew by {grown >> 20} MiB"
        expected = hashlib.sha256((root / "big.bin").read_bytes()).digest()
        for stream, digest, count in readers:
            assert count + await read_rest(stream, digest) == SIZE
            assert digest.digest() == expected
            await stream.aclose()
