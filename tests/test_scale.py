"""Many sessions at once and large transfers, checksummed end to end through the bridge."""

from __future__ import annotations

import hashlib
import os
import random
import resource
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from websockets.frames import Opcode
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .conftest import (
    BridgeStarter,
    Handler,
    RawClient,
    StartTarget,
    TcpTarget,
    check_echo,
    client_frame,
)

SESSIONS = 500


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """Each session costs four descriptors in this process (client, bridge x2, target)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SESSIONS * 4 + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def relay_checksummed(ws: ClientConnection, messages: list[bytes]) -> tuple[str, str]:
    """Send ``messages`` while reading the echo; the SHA-256 of what went and what came back."""
    sent = hashlib.sha256()
    received = hashlib.sha256()
    total = sum(map(len, messages))

    async def read_all() -> None:
        got = 0
        while got < total:
            data = await ws.recv()
            assert isinstance(data, bytes)
            received.update(data)
            got += len(data)
        assert got == total

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for message in messages:
            sent.update(message)
            await ws.send(message)
    return sent.hexdigest(), received.hexdigest()


async def test_500_concurrent_sessions_checksummed(
    start_bridge: BridgeStarter, echo_target: TcpTarget, enough_file_descriptors: None
) -> None:
    running = await start_bridge(echo_target.address)
    connected = 0
    all_connected = trio.Event()
    most_sessions = 0
    results: list[tuple[str, str]] = []
    relayed = 0

    async def session(index: int) -> None:
        nonlocal connected, most_sessions, relayed
        rng = random.Random(index)
        messages = [rng.randbytes(rng.randrange(1, 16_384)) for _ in range(rng.randrange(1, 6))]
        async with connect(
            running.url, subprotocols=[Subprotocol("binary")], open_timeout=None, ping_interval=None
        ) as ws:
            await check_echo(ws, b"open %d" % index)  # the session relays
            connected += 1
            if connected == SESSIONS:
                most_sessions = echo_target.accepted - echo_target.closed
                all_connected.set()
            await all_connected.wait()  # every session is open before any relays
            results.append(await relay_checksummed(ws, messages))
            relayed += sum(map(len, messages))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(SESSIONS):
                nursery.start_soon(session, index)
    assert most_sessions == SESSIONS
    assert len(results) == SESSIONS
    assert all(sent == received for sent, received in results)
    assert relayed > SESSIONS * 8_000


def sink_and_source(
    upload_size: int, download: bytes, uploaded: list[tuple[int, str]], *, at_once: bool
) -> Handler:
    """A target that hashes ``upload_size`` bytes received and sends ``download``: one after
    the other, or both at once. Not an echo: an echo couples the two directions through
    the test itself, and websockets' Trio client reads under the lock its writer holds
    (``recv_events`` -> ``send_data``), so a bulk echo through any relay can deadlock it.
    """

    async def handler(stream: trio.SocketStream) -> None:
        async def sink() -> None:
            digest = hashlib.sha256()
            got = 0
            while got < upload_size:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            uploaded.append((got, digest.hexdigest()))

        async with trio.open_nursery() as nursery:
            if at_once:
                nursery.start_soon(sink)
            else:
                await sink()
            await stream.send_all(download)
        assert await stream.receive_some() == b""  # the bridge closes after the client

    return handler


async def fail_if_stalled(progress: Callable[[], int], window: float) -> None:
    """A watchdog, not synchronisation: fail fast when no byte moved for ``window`` s."""
    last = progress()
    while True:
        await trio.sleep(window)
        now = progress()
        if now == last:
            raise AssertionError(f"transfer stalled for {window:g} s after {now} bytes")
        last = now


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "framed"])
@pytest.mark.parametrize("at_once", [False, True], ids=["one_way_then_other", "at_once"])
async def test_64_mib_each_way_checksummed(
    start_bridge: BridgeStarter,
    start_target: StartTarget,
    monkeypatch: pytest.MonkeyPatch,
    zero_copy: bool,
    at_once: bool,
) -> None:
    splices = 0
    real_splice = os.splice

    def counting_splice(*args: Any, **kwargs: Any) -> int:
        nonlocal splices
        splices += 1
        return real_splice(*args, **kwargs)

    monkeypatch.setattr(os, "splice", counting_splice)
    size = 64 << 20
    upload = random.Random("up").randbytes(size)
    download = random.Random("down").randbytes(size)
    uploaded: list[tuple[int, str]] = []
    target = await start_target(sink_and_source(size, download, uploaded, at_once=at_once))
    running = await start_bridge(target.address, zero_copy=zero_copy)
    received = hashlib.sha256()
    moved = [0, 0]
    chunk = 256 << 10
    with trio.fail_after(60):
        async with connect(
            running.url, subprotocols=[Subprotocol("binary")], max_size=None, close_timeout=1
        ) as ws:

            async def send_upload() -> None:
                view = memoryview(upload)
                for offset in range(0, size, chunk):
                    await ws.send(view[offset : offset + chunk])
                    moved[0] += chunk

            async def read_download() -> None:
                while moved[1] < size:
                    data = await ws.recv()
                    assert isinstance(data, bytes)
                    received.update(data)
                    moved[1] += len(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail_if_stalled, lambda: sum(moved), 3.0)
                if at_once:
                    nursery.start_soon(send_upload)
                else:
                    await send_upload()
                await read_download()
                nursery.cancel_scope.cancel()
        await target.closed_event.wait()
    assert uploaded == [(size, hashlib.sha256(upload).hexdigest())]
    assert received.hexdigest() == hashlib.sha256(download).hexdigest()
    if zero_copy:
        assert splices > 0, "zero_copy=True never used splice(2)"
    else:
        assert splices == 0, "zero_copy=False used splice(2)"


async def test_upload_flows_while_client_leaves_download_unread(
    start_bridge: BridgeStarter, start_target: StartTarget
) -> None:
    """Input (keys, mouse) must reach the target while screen data waits for the client.

    The target sends without end and the client never reads, so the path to the client
    fills up within a few MiB; 64 MiB of upload must still get through.
    """
    upload_size = 64 << 20
    frame_size = 64 << 10
    all_uploaded = trio.Event()
    got = [0]

    async def busy_target(stream: trio.SocketStream) -> None:
        async def sink() -> None:
            while got[0] < upload_size:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    return
                got[0] += len(chunk)
            all_uploaded.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            block = bytes(1 << 20)
            while True:
                await stream.send_all(block)

    target = await start_target(busy_target)
    running = await start_bridge(target.address)
    frame = client_frame(Opcode.BINARY, b"k" * frame_size)  # one mask for all: fine here
    with trio.fail_after(30):
        client = await RawClient.open(running.port)
        await client.handshake()
        async with trio.open_nursery() as nursery:

            async def upload() -> None:
                for _ in range(upload_size // frame_size):
                    await client.send(frame)

            nursery.start_soon(upload)
            nursery.start_soon(fail_if_stalled, lambda: got[0], 2.0)
            await all_uploaded.wait()
            nursery.cancel_scope.cancel()
        await client.aclose()
    assert got[0] == upload_size
