"""Relay correctness through real sockets with websockets' own Trio client."""

from __future__ import annotations

import errno
import hashlib
import random

import pytest
import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge import zerocopy
from trio_bridge.pipes import PIPES, Pipe
from trio_bridge.zerocopy import binary_frame_header

from .conftest import BridgeStarter, LogWaiter, RunningBridge, TcpTarget, check_echo


async def test_binary_subprotocol_selected_and_echoed(bridge: RunningBridge) -> None:
    with trio.fail_after(10):
        async with connect(bridge.url, subprotocols=[Subprotocol("binary")]) as ws:
            assert ws.subprotocol == "binary"
            await ws.send(b"\x00\x01hello")
            assert await ws.recv() == b"\x00\x01hello"


async def test_client_offering_no_subprotocol_is_accepted(bridge: RunningBridge) -> None:
    with trio.fail_after(10):
        async with connect(bridge.url) as ws:
            assert ws.subprotocol is None
            await ws.send("héllo")  # text frames reach the target as UTF-8 bytes
            assert await ws.recv() == "héllo".encode()


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "framed"])
async def test_random_sized_streams_both_ways_checksummed(
    start_bridge: BridgeStarter, echo_target: TcpTarget, zero_copy: bool
) -> None:
    running = await start_bridge(echo_target.address, zero_copy=zero_copy)
    rng = random.Random(1234)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    total = 0
    with trio.fail_after(30):
        async with connect(running.url, subprotocols=[Subprotocol("binary")], max_size=None) as ws:

            async def reader(count: int) -> None:
                got = 0
                while got < count:
                    data = await ws.recv()
                    assert isinstance(data, bytes)
                    received.update(data)
                    got += len(data)

            sizes = [
                rng.choice([1, 2, 125, 126, 127, 65535, 65536, 65537, rng.randrange(1, 300_000)])
                for _ in range(200)
            ]
            total = sum(sizes)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, total)
                for size in sizes:
                    payload = rng.randbytes(size)
                    sent.update(payload)
                    await ws.send(payload)
    assert received.hexdigest() == sent.hexdigest()
    assert total > 1_000_000


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_zero_copy_header_matches_websockets(length: int) -> None:
    from websockets.frames import Frame, Opcode

    reference = Frame(Opcode.BINARY, b"x" * length).serialize(mask=False, extensions=[])
    header = binary_frame_header(length)
    assert reference[: len(header)] == header
    assert len(reference) == len(header) + length


async def test_bulk_data_relays_framed_when_no_pipe_can_be_had(
    start_bridge: BridgeStarter,
    echo_target: TcpTarget,
    bridge_log: LogWaiter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries = 0

    def no_pipe() -> Pipe:
        nonlocal tries
        tries += 1
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(PIPES, "take", no_pipe)
    zerocopy._no_pipe_log.flush()  # forget an earlier test's report: it is rate-limited
    running = await start_bridge(echo_target.address, zero_copy=True)
    with trio.fail_after(10):
        async with connect(running.url, max_size=None) as ws:
            for _ in range(3):
                await check_echo(ws, random.randbytes(1 << 20))
        await bridge_log.wait_for("no pipe for splice", "Too many open files", "relaying framed")
    assert tries > 0  # full reads did try to splice
