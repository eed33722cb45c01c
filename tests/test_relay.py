"""Relay correctness through real sockets with websockets' own Trio client."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.zerocopy import binary_frame_header

from .conftest import BridgeStarter, RunningBridge, TcpTarget


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
