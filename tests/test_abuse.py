"""Per-address limits: the arithmetic with a fake clock, then a flood of over a thousand
hostile connections from one address while other clients keep being served."""

from __future__ import annotations

from collections import Counter

import trio
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.limits import AddressLimiter, Admission
from trio_bridge.routing import HttpRefusal

from .conftest import BridgeStarter, LogWaiter, TcpTarget, check_echo, healthy_session, ws_request
from .security_support import open_from, parse_response, raise_fd_limit

HOSTILE, NEIGHBOUR = "127.0.0.2", "127.0.0.3"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admitted(result: Admission | HttpRefusal) -> Admission:
    assert isinstance(result, Admission), result
    return result


def refused(result: Admission | HttpRefusal, text: str) -> HttpRefusal:
    assert isinstance(result, HttpRefusal) and result.status == 429, result
    assert text in result.reason
    return result


def test_concurrency_cap_and_token_bucket() -> None:
    clock = Clock()
    limiter = AddressLimiter(2, rate=1.0, burst=3, exempt=["10.9.0.0/16"], clock=clock)
    first = admitted(limiter.admit_address("192.0.2.1", "p"))
    second = admitted(limiter.admit_address("192.0.2.1", "p"))
    refused(limiter.admit_address("192.0.2.1", "p"), "at most 2 at a time")
    admitted(limiter.admit_address("192.0.2.9", "p"))  # another address is not affected
    first.release()
    first.release()  # idempotent
    with admitted(limiter.admit_address("192.0.2.1", "p")):
        pass
    second.release()
    rate = refused(limiter.admit_address("192.0.2.1", "p"), "at most 1 per second")
    assert rate.headers == [("Retry-After", "1")]
    clock.now += 1.0
    admitted(limiter.admit_address("192.0.2.1", "p")).release()
    for _ in range(50):
        admitted(limiter.admit_address("10.9.3.4", "p"))  # exempt


def test_ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() -> None:
    limiter = AddressLimiter(1, rate=None, burst=1, clock=Clock())
    admitted(limiter.admit_address("2001:db8::1", "p"))
    refused(limiter.admit_address("2001:db8::ffff:2", "p"), "at a time")
    admitted(limiter.admit_address("2001:db8:0:1::1", "p"))
    admitted(limiter.admit_address("192.0.2.1", "p"))
    refused(limiter.admit_address("::ffff:192.0.2.1", "p"), "at a time")


def test_state_is_forgotten_once_buckets_refill() -> None:
    clock = Clock()
    limiter = AddressLimiter(None, rate=10.0, burst=5, clock=clock)
    for i in range(5000):  # buckets still refilling must be kept
        admitted(limiter.admit_address(f"10.{i // 256}.{i % 256}.1", "p")).release()
    assert limiter.tracked() == 5000
    clock.now += 1.0  # now full again: forgotten at the next sweep
    for i in range(4000):
        admitted(limiter.admit_address(f"172.16.{i // 256}.{i % 256}", "p")).release()
    assert limiter.tracked() < 5000


async def hostile_request(port: int) -> tuple[int, bool]:
    """Connect from HOSTILE, send a handshake, read the status line and headers, leave.

    Returns the status and whether a Retry-After header came with it."""
    stream = await open_from(port, HOSTILE)
    async with stream:
        await stream.send_all(ws_request())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed without a response: {data!r}"
            data += chunk
        if not data.startswith(b"HTTP/1.1 101 "):  # a refusal: its body, then EOF
            data += b"".join([chunk async for chunk in stream])
        else:
            data = data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    response = parse_response(data)
    return response.status_code, "Retry-After" in response.headers


async def test_a_thousand_hostile_connections_do_not_stop_other_clients(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    raise_fd_limit(2048)
    running = await start_bridge(
        echo_target.address,
        limit_exempt=(),
        max_connections_per_address=20,
        connection_rate=50.0,
        connection_burst=50,
        max_connections=100,
        handshake_timeout=30,
    )
    statuses: Counter[int] = Counter()
    retry_after = 0
    with trio.fail_after(60):
        async with healthy_session(running.url) as healthy:
            flood_done = trio.Event()
            round_trips = 0

            async def keep_relaying() -> None:
                nonlocal round_trips
                while not flood_done.is_set():
                    await check_echo(healthy, b"healthy %d" % round_trips)
                    round_trips += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_relaying)

                # 1. Slowloris: 100 connections that send nothing. 20 are admitted and sit
                #    in the handshake; 80 are answered 429 at once.
                idle = []
                for _ in range(100):
                    stream = await open_from(running.port, HOSTILE)
                    idle.append(stream)
                for stream in idle[20:]:
                    response = parse_response(b"".join([chunk async for chunk in stream]))
                    statuses[response.status_code] += 1
                assert statuses == Counter({429: 80})
                assert running.bridge.connections <= 21  # the idle 20, the healthy one

                # The global limit (100) is far away: a neighbour is served meanwhile.
                stream = await open_from(running.port, NEIGHBOUR)
                async with connect(
                    running.url, stream=stream, subprotocols=[Subprotocol("binary")]
                ) as ws:
                    await check_echo(ws, b"neighbour during the slowloris")

                for stream in idle:
                    await stream.aclose()

                # 2. A flood: 1,000 handshakes as fast as 50 parallel connections go.
                results: list[tuple[int, bool]] = []

                async def worker(count: int) -> None:
                    for _ in range(count):
                        results.append(await hostile_request(running.port))

                async with trio.open_nursery() as flood:
                    for _ in range(50):
                        flood.start_soon(worker, 20)
                    neighbour = await open_from(running.port, NEIGHBOUR)
                    async with connect(
                        running.url, stream=neighbour, subprotocols=[Subprotocol("binary")]
                    ) as ws:
                        await check_echo(ws, b"neighbour during the flood")
                for status, has_retry_after in results:
                    statuses[status] += 1
                    retry_after += has_retry_after
                flood_done.set()

    assert len(results) == 1000
    assert set(statuses) <= {101, 429}
    assert statuses[429] >= 800, statuses
    assert retry_after > 0  # rate refusals say when to come back
    assert round_trips > 20  # the healthy session relayed all along
    record = await bridge_log.wait_for(f"client {HOSTILE}:", "refused with 429")
    assert record.levelname == "WARNING"
    refusal_lines = [r for r in bridge_log.caplog.records if "refused with 429" in r.getMessage()]
    assert len(refusal_lines) <= 3, "a flood must not flood the log"
