"""The /metrics endpoint: scraped over HTTP, parsed with prometheus_client's own parser,
and counters checked against real sessions and real failed handshakes."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge import __version__
from trio_bridge.addons import Addons
from trio_bridge.cli import build_parser, config_from_args
from trio_bridge.config import Config, Limits, ServiceConfig, TcpAddress, WrapConfig
from trio_bridge.handshake import HandshakeFailure
from trio_bridge.metrics import BridgeMetrics, close_code_label
from trio_bridge.recording import load_recording
from trio_bridge.server import Bridge
from trio_bridge.session import SessionStats

from .conftest import TcpTarget, free_port, loopback_listener
from .recording_support import scripted_target, start_logged, start_tcp_target
from .test_recording_failures import relay_messages, tiny_filesystem
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


def exposed(metrics: BridgeMetrics) -> str:
    return generate_latest(metrics.registry).decode()


DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_rows(heading: str) -> list[list[str]]:
    """The body rows of the first table under ``heading`` in docs/metrics.md."""
    section = DOCS.read_text().split(f"\n{heading}\n", 1)[1]
    rows: list[list[str]] = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # the header and its --- line


def quoted(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


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
            target=target or echo_target.address, limits=Limits(close_timeout=0.5, **limits)
        )
        addons = Addons(ServiceConfig(config, metrics_listen=TcpAddress("127.0.0.1", metrics_port)))
        listener = loopback_listener()
        bridge = addons.bridge
        await nursery.start(addons.serve, [listener])
        return Scraped(bridge, listener.getsockname()[1], metrics_port)

    return start


async def test_counters_move_with_real_sessions(start_scraped: Start) -> None:
    scraped = await start_scraped()
    with trio.fail_after(10):
        before = await scraped.scrape()
        assert value(before, "trio_bridge_sessions_open") == 0
        assert value(before, "trio_bridge_sessions_total") == 0
        async with connect(scraped.url, subprotocols=[Subprotocol("binary")]) as first:
            async with connect(scraped.url, subprotocols=[Subprotocol("binary")]) as second:
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
        async with connect(scraped.url, subprotocols=[Subprotocol("binary")]) as ws:
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
    assert value(samples, "process_max_fds") > value(samples, "process_open_fds")
    assert value(samples, "trio_bridge_build_info", version=__version__) == 1
    assert value(samples, "trio_bridge_recording_gaps_total") == 0
    assert value(samples, "trio_bridge_recording_lost_bytes_total") == 0


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


async def test_endpoint_reads_requests_as_they_come(start_scraped: Start) -> None:
    """The request head may arrive a byte at a time; a body or an over-long line is
    not a request the endpoint answers: it closes the connection."""
    scraped = await start_scraped()

    async def exchange(*chunks: bytes) -> bytes:
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", scraped.metrics_port) as stream:
                data = b""
                try:
                    for chunk in chunks:
                        await stream.send_all(chunk)
                        await trio.sleep(0.001)
                    await stream.send_eof()
                    while more := await stream.receive_some(65536):
                        data += more
                except trio.BrokenResourceError:  # reset: closed with our bytes unread
                    pass
                return data

    request = b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    trickled = await exchange(*(request[i : i + 1] for i in range(len(request))))
    assert trickled.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n\r\n# HELP " in trickled
    with_body = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    assert await exchange(with_body) == b""
    assert await exchange(b"GET /" + b"m" * 9000 + b" HTTP/1.1\r\n\r\n") == b""
    assert await exchange(b"GET /metrics HTTP/1.1\r\n") == b""  # gone before the end


class BrokenCollector:
    """A component's collector with a bug: it raises at scrape time."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector's bug")


async def test_a_failing_collector_ends_only_its_scrape(
    start_scraped: Start, caplog: pytest.LogCaptureFixture
) -> None:
    scraped = await start_scraped()
    broken = BrokenCollector()
    scraped.bridge.metrics.registry.register(broken)
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", scraped.metrics_port) as stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await stream.receive_some(1024) == b""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "metrics: answering a scrape failed; the connection is closed"
    ]
    scraped.bridge.metrics.registry.unregister(broken)
    assert value(await scraped.scrape(), "trio_bridge_sessions_open") == 0


def test_the_exposition_is_the_documented_interface() -> None:
    """Every family a bridge exposes (wrap mode and process ones included) has the name,
    type and label names docs/metrics.md gives it, and none is undocumented."""
    addons = Addons(ServiceConfig(Config(target=None), wrap=WrapConfig(("true",))))
    stats = SessionStats("s1", "client", "target", close_code=1000, closed_by="client")
    addons.metrics.session_opened(stats)
    addons.metrics.session_closed(stats)
    text = exposed(addons.metrics)
    scraped: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser names a counter family without its _total, as OpenMetrics does.
        name = family.name + "_total" if family.type == "counter" else family.name
        scraped[name] = (family.type, {key for s in family.samples for key in s.labels})
    documented: dict[str, tuple[str, set[str]]] = {}
    for names, kind, labels, _ in documented_rows("## What is exposed"):
        for name in quoted(names):
            documented[name] = (kind, set(quoted(labels)))
    assert scraped == documented
    assert "_created" not in text


def test_docs_list_every_handshake_failure_reason() -> None:
    documented = {quoted(row[0])[0] for row in documented_rows("### Handshake failure reasons")}
    assert documented == {reason.value for reason in HandshakeFailure} | {"http_<status>"}
    # ... and each fixed one is exported from the start.
    samples = parse(exposed(BridgeMetrics(process=False)))
    for reason in HandshakeFailure:
        assert value(samples, "trio_bridge_handshake_failures_total", reason=reason) == 0


async def test_recording_gaps_on_a_full_disk_are_counted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The CLI's recording bridge on a 1 MiB tmpfs, 2 MiB relayed each way: the recorder
    drops what the disk cannot take, and /metrics counts those gaps and their bytes as
    the finished recording's GAP records do."""
    with tiny_filesystem(tmp_path / "small", "1m") as folder:
        target = await start_tcp_target(nursery, scripted_target(greeting=b""))
        metrics_port = free_port()
        code = "import sys; from trio_bridge.cli import main; sys.exit(main())"
        command = [sys.executable, "-c", code, "--record", str(folder)]
        command += ["--metrics", f"127.0.0.1:{metrics_port}", "127.0.0.1:0", str(target)]
        log = await start_logged(nursery, command)
        process = log.process
        try:
            with trio.fail_after(30):
                port = await log.port()
                before = parse((await fetch(metrics_port, "/metrics")).body.decode())
                await relay_messages(f"ws://127.0.0.1:{port}/", 32)
                # The writer's last word on a recording, logged once its file is closed.
                await log.wait_for(re.compile(rb"recording \S+ is missing \d+ frames"))
                after = parse((await fetch(metrics_port, "/metrics")).body.decode())
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            print(await log.until_closed())  # shown when the test fails
        (path,) = folder.glob("*.tbrec")
        recording = load_recording(path)
    assert value(before, "trio_bridge_recording_gaps_total") == 0
    assert recording.gaps, recording.status.describe()
    assert value(after, "trio_bridge_recording_gaps_total") == len(recording.gaps)
    lost = sum(gap.total_bytes for gap in recording.gaps)
    assert value(after, "trio_bridge_recording_lost_bytes_total") == lost > 0


def test_recording_gaps_count_gaps_and_lost_bytes() -> None:
    metrics = BridgeMetrics(process=False)
    metrics.recording_gap(3, 4096)  # the recorder's on_gap(frames_dropped, bytes_dropped)
    metrics.recording_gap(1, 10)
    samples = parse(exposed(metrics))
    assert value(samples, "trio_bridge_recording_gaps_total") == 2
    assert value(samples, "trio_bridge_recording_lost_bytes_total") == 4106


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


def test_each_bridge_counts_in_its_own_registry() -> None:
    """Two bridges in one process: their own figures, nothing in prometheus_client's
    global registry; a bare Bridge has no process metrics (the process is not its own)."""
    config = Config(target=TcpAddress("127.0.0.1", 5900))
    first, second = Bridge(config), Bridge(config)
    first.metrics.handshake_failed(HandshakeFailure.TIMEOUT)
    first.metrics.handshake_failed(404)
    one, other = parse(exposed(first.metrics)), parse(exposed(second.metrics))
    assert value(one, "trio_bridge_handshake_failures_total", reason="timeout") == 1
    assert value(one, "trio_bridge_handshake_failures_total", reason="http_404") == 1
    assert value(other, "trio_bridge_handshake_failures_total", reason="timeout") == 0
    assert ("process_resident_memory_bytes", frozenset()) not in one
    assert "trio_bridge" not in generate_latest(REGISTRY).decode()
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
