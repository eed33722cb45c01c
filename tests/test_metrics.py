"""The /metrics endpoint: scraped over HTTP, parsed with prometheus_client's own parser,
and counters checked against real sessions and real failed handshakes."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from websockets.trio.client import connect

from trio_bridge.addons import Addons
from trio_bridge.cli import build_parser, config_from_args
from trio_bridge.config import Config, Limits, TcpAddress
from trio_bridge.metrics import BridgeMetrics, Counter, Registry, close_code_label
from trio_bridge.server import Bridge

from .conftest import TcpTarget, free_port, loopback_listener
from .test_web import fetch

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels); raises if the exposition is malformed."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class Scraped:
    def __init__(self, bridge: Bridge, ws_port: int, metrics_port: int) -> None:
        self.bridge = bridge
        self.port = ws_port
        self.url = f"ws://127.0.0.1:{ws_port}/"
        self.metrics_port = metrics_port

    async def scrape(self) -> Samples:
        reply = await fetch(self.metrics_port, "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(reply.body.decode())

    async def scrape_until(self, name: str, expected: float, **labels: str) -> Samples:
        """Scrape until a sample has the expected value (sessions end asynchronously)."""
        while True:
            samples = await self.scrape()
            if value(samples, name, **labels) == expected:
                return samples
            await trio.sleep(0.02)


Start = Callable[..., Awaitable[Scraped]]


@pytest.fixture
async def start_scraped(nursery: trio.Nursery, echo_target: TcpTarget) -> Start:
    """A bridge built as the CLI builds it, with ``--metrics`` on a free port."""

    async def start(target: Any = None, **limits: Any) -> Scraped:
        metrics_port = free_port()
        config = Config(
            target=target or echo_target.address,
            limits=Limits(close_timeout=0.5, **limits),
            metrics_listen=TcpAddress("127.0.0.1", metrics_port),
        )
        addons = Addons(config)
        listener = loopback_listener()
        bridge = addons.bridge()
        await nursery.start(addons.serve, bridge, [listener])
        return Scraped(bridge, listener.getsockname()[1], metrics_port)

    return start


async def test_counters_move_with_real_sessions(start_scraped: Start) -> None:
    scraped = await start_scraped()
    with trio.fail_after(10):
        before = await scraped.scrape()
        assert value(before, "trio_bridge_sessions_open") == 0
        assert value(before, "trio_bridge_sessions_total") == 0
        async with connect(scraped.url, subprotocols=["binary"]) as first:
            async with connect(scraped.url, subprotocols=["binary"]) as second:
                await first.send(b"x" * 1000)
                assert await first.recv() == b"x" * 1000
                await second.send(b"y" * 24)
                assert await second.recv() == b"y" * 24
                live = await scraped.scrape()
                assert value(live, "trio_bridge_sessions_open") == 2
                assert value(live, "trio_bridge_sessions_total") == 2
                # Live sessions count before they end.
                up = value(live, "trio_bridge_bytes_total", direction="client_to_target")
                down = value(live, "trio_bridge_bytes_total", direction="target_to_client")
                assert (up, down) == (1024, 1024)
                await second.aclose(1000)
            one_left = await scraped.scrape_until("trio_bridge_sessions_open", 1)
            assert value(one_left, "trio_bridge_sessions_open") == 1
            closed = value(
                one_left, "trio_bridge_sessions_closed_total", code="1000", closed_by="client"
            )
            assert closed == 1
            # An ended session's bytes stay counted: counters never go down.
            assert value(one_left, "trio_bridge_bytes_total", direction="client_to_target") == 1024
        after = await scraped.scrape_until("trio_bridge_sessions_open", 0)
        assert value(after, "trio_bridge_sessions_open") == 0
        assert value(after, "trio_bridge_sessions_total") == 2
        assert (
            value(after, "trio_bridge_sessions_closed_total", code="1000", closed_by="client") == 2
        )


async def test_handshake_failures_by_reason(start_scraped: Start) -> None:
    unused = TcpAddress("127.0.0.1", free_port())
    scraped = await start_scraped(target=unused, handshake_timeout=0.3)
    with trio.fail_after(10):
        # A plain GET on a bridge without --web: 426.
        assert (await fetch(scraped.port, "/")).status == 426
        # Not HTTP at all.
        stream = await trio.open_tcp_stream("127.0.0.1", scraped.port)
        await stream.send_all(b"\x16\x03\x01 binary junk\r\n\r\n")
        while await stream.receive_some(1024):
            pass
        await stream.aclose()
        # Says nothing: times out.
        stream = await trio.open_tcp_stream("127.0.0.1", scraped.port)
        while await stream.receive_some(1024):
            pass
        await stream.aclose()
        # Goes away mid-request.
        stream = await trio.open_tcp_stream("127.0.0.1", scraped.port)
        await stream.send_all(b"GET / HTTP/1.1\r\n")
        await stream.aclose()
        # A good handshake, but the target refuses: the session never opens.
        async with connect(scraped.url, subprotocols=["binary"]) as ws:
            with pytest.raises(Exception, match="refused"):
                await ws.recv()
        samples = await scraped.scrape_until(
            "trio_bridge_handshake_failures_total", 1, reason="client_gone"
        )
    failures = {
        dict(labels)["reason"]: count
        for (name, labels), count in samples.items()
        if name == "trio_bridge_handshake_failures_total" and count
    }
    assert failures == {
        "http_426": 1,
        "malformed": 1,
        "timeout": 1,
        "client_gone": 1,
        "target_unavailable": 1,
    }
    assert value(samples, "trio_bridge_sessions_total") == 0


async def test_process_and_build_metrics(start_scraped: Start) -> None:
    scraped = await start_scraped()
    samples = await scraped.scrape()
    assert value(samples, "process_resident_memory_bytes") > 1 << 20
    assert value(samples, "process_virtual_memory_bytes") > value(
        samples, "process_resident_memory_bytes"
    )
    assert value(samples, "process_open_fds") > 3
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "trio_bridge_recording_gaps_total") == 0
    scraped.bridge.metrics.recording_gaps.inc()  # as the recorder does
    scraped.bridge.metrics.recording_gaps.inc(2)
    assert value(await scraped.scrape(), "trio_bridge_recording_gaps_total") == 3


async def test_endpoint_paths_and_methods(start_scraped: Start) -> None:
    scraped = await start_scraped()
    head = await fetch(scraped.metrics_port, "/metrics", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["Content-Length"]) > 100
    assert (await fetch(scraped.metrics_port, "/")).status == 404
    assert (await fetch(scraped.metrics_port, "/metrics", method="POST")).status == 405
    # Garbage gets the connection closed, and the endpoint keeps serving.
    stream = await trio.open_tcp_stream("127.0.0.1", scraped.metrics_port)
    await stream.send_all(b"\x00\x01\x02 not http\r\n\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some(1024) == b""
    await stream.aclose()
    assert (await fetch(scraped.metrics_port, "/metrics")).status == 200


def test_exposition_escapes_labels_and_help() -> None:
    registry = Registry()
    counter = registry.counter("odd_total", "help with \\ and\nnewline", ("label",))
    counter.inc(label='quote " backslash \\ newline \n end')
    counter.inc(0.5, label="plain")
    samples = parse(registry.render())
    assert value(samples, "odd_total", label='quote " backslash \\ newline \n end') == 1
    assert value(samples, "odd_total", label="plain") == 0.5
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1, label="plain")
    with pytest.raises(ValueError, match="labels"):
        counter.inc(other="x")
    with pytest.raises(ValueError, match="_total"):
        Counter("no_suffix", "x")
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("odd_total", "again")


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "none"),
        (1000, "1000"),
        (1011, "1011"),
        (3003, "3xxx"),
        (4999, "4xxx"),
        (2000, "other"),
    ],
)
def test_close_codes_are_a_bounded_label(code: int | None, label: str) -> None:
    assert close_code_label(code) == label


def test_a_bare_bridge_counts_without_process_metrics() -> None:
    config = Config(target=TcpAddress("127.0.0.1", 5900))
    samples = parse(Bridge(config).metrics.render())
    assert ("process_resident_memory_bytes", frozenset()) not in samples
    assert isinstance(Bridge(config, metrics=BridgeMetrics()).metrics, BridgeMetrics)


def test_metrics_option_defaults_to_loopback() -> None:
    args = build_parser().parse_args(["6080", "localhost:5900", "--metrics", "9100"])
    args.wrap_command = []
    assert config_from_args(args).metrics_listen == TcpAddress("127.0.0.1", 9100)
    args = build_parser().parse_args(["6080", "localhost:5900", "--metrics", "[::]:9100"])
    assert config_from_args(args).metrics_listen == TcpAddress("::", 9100)


async def test_systemd_socket_named_metrics_is_served() -> None:
    """``FileDescriptorName=metrics``: served as the endpoint instead of binding --metrics."""
    ws_port, metrics_port = free_port(), free_port()
    argv = [
        "systemd-socket-activate", "-l", f"127.0.0.1:{ws_port}", "-l", f"127.0.0.1:{metrics_port}",
        "--fdname=ws:metrics", sys.executable, "-m", "trio_bridge.cli", "localhost:5900",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(20):
            # systemd-socket-activate binds, then starts the bridge on the first connection.
            while True:
                try:
                    reply = await fetch(metrics_port, "/metrics")
                    break
                except OSError:  # not bound yet
                    await trio.sleep(0.05)
            assert reply.status == 200
            assert value(parse(reply.body.decode()), "trio_bridge_sessions_open") == 0
            assert (await fetch(ws_port, "/healthz")).status == 200
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
