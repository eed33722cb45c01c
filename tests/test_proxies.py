"""Behind a load balancer (issue 13 §3, docs/scaling.md): the PROXY protocol header and
the forwarding headers name the client, and the name reaches the logs, the per-address
limits, the recordings and the auth gates.

The parsers are checked on their own (tables and hypothesis: malformed input is always
a ProxyHeaderError or ForwardedError naming the cause, never a crash), then through a
bridge: raw sockets for what no real proxy sends (a header from the wrong address, no
header at all, v1 by hand), and real HAProxy (TCP mode, ``send-proxy-v2`` and
``send-proxy``) and nginx (a WebSocket reverse proxy appending to X-Forwarded-For),
started here on free ports as the current user. Clients use distinct 127.0.0.x source
addresses so that "the proxy's address" and "the client's address" differ.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.frames import Opcode
from websockets.http11 import Request

from trio_bridge import Bridge, Config, TcpAddress
from trio_bridge.config import ConfigError, Limits
from trio_bridge.forwarded import ForwardedError, forwarded_client
from trio_bridge.limits import Networks
from trio_bridge.logs import escape
from trio_bridge.proxy_header import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse
from trio_bridge.recording import Recorder, load_recording
from trio_bridge.routing import ClientInfo

from .conftest import LogWaiter, RawClient, TcpTarget, client_frame, free_port, ws_request
from .recording_support import ProcessLog, start_logged
from .security_support import Pki, open_from, pki, read_all, redis_server

__all__ = ["pki"]

PROXY, CLIENT, NEIGHBOUR = "127.0.0.1", "127.0.0.2", "127.0.0.3"
DOCS = Path(__file__).parent.parent / "docs"


# -- the PROXY header parser ----------------------------------------------------------------


def v2(block: bytes, *, command: int = 1, family: int = 0x11, version: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(block))


def v2_tcp4(source: str, port: int, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton("10.0.0.1") + struct.pack("!HH", port, 80)
    return v2(block + tlvs) + block + tlvs


def v2_tcp6(source: str, port: int) -> bytes:
    ip = socket.inet_pton(socket.AF_INET6, source)
    block = ip + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", port, 443)
    return v2(block, family=0x21) + block


def v2_with(block: bytes, **fields: int) -> bytes:
    return v2(block, **fields) + block


UNIQUE_ID_TLV = bytes([0x05]) + struct.pack("!H", 4) + b"abcd"
VALID = [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 40112 6080\r\n", 1, ("203.0.113.7", 40112)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n", 1, ("2001:db8::7", 65535)),
    (b"PROXY UNKNOWN\r\n", 1, None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", 1, None),
    (v2_tcp4("203.0.113.7", 40112), 2, ("203.0.113.7", 40112)),
    (v2_tcp4("203.0.113.7", 1, UNIQUE_ID_TLV), 2, ("203.0.113.7", 1)),
    (v2_tcp6("2001:db8::7", 4711), 2, ("2001:db8::7", 4711)),
    (v2_with(bytes(12), command=0, family=0x11), 2, None),  # LOCAL: addresses skipped
    (v2_with(b"", command=0, family=0x00), 2, None),  # LOCAL, as HAProxy's checks send it
    (v2_with(b"", family=0x00), 2, None),  # PROXY over UNSPEC: no address to use
]


@pytest.mark.parametrize(("header", "version", "source"), VALID)
def test_valid_headers_parse_whole_and_only_whole(
    header: bytes, version: int, source: tuple[str, int] | None
) -> None:
    expected = ProxyHeader(version, source, len(header))
    assert parse(header) == expected
    assert parse(header + b"GET / HTTP/1.1\r\n") == expected  # what follows is not read
    assert parse(header + b"\x16\x03\x01") == expected
    for end in range(len(header)):
        assert parse(header[:end]) is None, end  # incomplete, never an error or a header


MALFORMED = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "no PROXY protocol header: the connection starts"),
    (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 1\r\n", "port '080' is not a port number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 1\r\n", "port '+80' is not a port number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n", "port 65536 is out of range"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "address '01.2.3.4' is not an IP address"),
    (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "'1.2.3.\\xff' is not an IP address"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1 line malformed"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1 line malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
    (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "PROXY v1 line malformed"),
    (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2", "not ended by CRLF"),
    (b"PROXY UNKNOWN" + b" ffff" * 30 + b"\r\n", "longer than 107 bytes"),
    (b"PROXY\r\n", "no PROXY protocol header"),
    (v2_with(bytes(12), version=1), "PROXY v2 header with version 1"),
    (v2_with(bytes(12), command=2), "unassigned command 0x2"),
    (v2_with(bytes(12), family=0x12), "family/protocol 0x12 (not TCP or UNSPEC)"),
    (v2_with(bytes(12), family=0x41), "family/protocol 0x41"),
    (v2_with(bytes(4)), "address block of 4 bytes, too short"),
    (v2_with(bytes(12), family=0x21), "address block of 12 bytes, too short"),
    (b"\r\n\r\nGET", "not a PROXY protocol header"),
]


@pytest.mark.parametrize(("data", "fragment"), MALFORMED)
def test_malformed_headers_are_refused_naming_the_cause(data: bytes, fragment: str) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse(data)
    message = str(caught.value)
    assert fragment in message
    assert escape(message) == message  # client bytes are escaped: one visible log line


def _check_any(data: bytes) -> ProxyHeader | None:
    """The parser's contract on any bytes: None, a header within them, or ProxyHeaderError
    with a one-line message; nothing else escapes."""
    try:
        header = parse(data)
    except ProxyHeaderError as exc:
        assert str(exc) and escape(str(exc)) == str(exc)
        return None
    if header is None:
        # Every byte seen belongs to the header: each prefix is incomplete too, so the
        # reader may consume them all without taking a byte of what follows.
        assert all(parse(data[:end]) is None for end in range(len(data)))
    else:
        assert 0 < header.length <= len(data)
        assert parse(data[: header.length]) == header
    return header


@given(st.binary(max_size=300))
def test_any_bytes_are_a_header_incomplete_or_a_clear_refusal(data: bytes) -> None:
    _check_any(data)


headers = st.sampled_from([header for header, _, _ in VALID])


@given(headers, st.integers(min_value=0, max_value=120), st.binary(min_size=1, max_size=4))
def test_damaged_headers_never_crash(header: bytes, at: int, junk: bytes) -> None:
    at %= len(header)
    _check_any(header[:at] + junk + header[at + len(junk) :])  # overwritten
    _check_any(header[:at] + junk)  # cut short, then junk


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535), st.binary(max_size=20))
def test_any_address_round_trips_through_both_versions(
    address: object, port: int, tail: bytes
) -> None:
    text = str(address)
    if ":" in text:
        line = f"PROXY TCP6 {text} ::1 {port} 80\r\n".encode()
        binary = v2_tcp6(text, port)
    else:
        line = f"PROXY TCP4 {text} 10.0.0.1 {port} 80\r\n".encode()
        binary = v2_tcp4(text, port)
    for header, version in ((line, 1), (binary, 2)):
        assert parse(header + tail) == ProxyHeader(version, (text, port), len(header))


# -- the forwarding headers -------------------------------------------------------------------

TRUSTED = Networks.parse(["10.0.0.0/8", "2001:db8:ffff::/48"], "--trusted-proxy")


def forwarded(header: str, *values: tuple[str, str]) -> tuple[str, str] | None:
    return forwarded_client(Headers(list(values)), header, TRUSTED)


XFF = "X-Forwarded-For"


def test_the_chain_is_walked_from_the_right_skipping_trusted_hops() -> None:
    assert forwarded("x-forwarded-for", (XFF, "203.0.113.7")) == ("203.0.113.7", "203.0.113.7")
    # The client wrote the left part: only the first untrusted hop from the right counts.
    spoofed = (XFF, "198.51.100.1, 203.0.113.7, 10.0.0.2")
    assert forwarded("x-forwarded-for", spoofed) == ("203.0.113.7", "203.0.113.7")
    lines = [(XFF, "garbage\x85"), (XFF, "203.0.113.7"), (XFF, "10.1.1.1")]
    assert forwarded("x-forwarded-for", *lines) == ("203.0.113.7", "203.0.113.7")
    assert forwarded("x-forwarded-for", (XFF, "203.0.113.7:4711")) == (
        "203.0.113.7",
        "203.0.113.7:4711",
    )
    assert forwarded("x-forwarded-for", (XFF, "[2001:db8::7]:4711, 2001:db8:ffff::1")) == (
        "2001:db8::7",
        "[2001:db8::7]:4711",
    )
    assert forwarded("x-forwarded-for", (XFF, "10.0.0.3, 10.0.0.2")) == ("10.0.0.3", "10.0.0.3")
    assert forwarded("x-forwarded-for", (XFF, " , 203.0.113.7 ,")) == ("203.0.113.7", "203.0.113.7")
    assert forwarded("x-forwarded-for", ("Forwarded", "for=203.0.113.7")) is None  # not read


def test_rfc_7239_forwarded() -> None:
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"'
    assert forwarded("forwarded", ("Forwarded", value)) == (
        "2001:db8:cafe::17",
        "[2001:db8:cafe::17]:4711",
    )
    assert forwarded("forwarded", ("Forwarded", "for=198.51.100.1, for=10.0.0.1;proto=https")) == (
        "198.51.100.1",
        "198.51.100.1",
    )
    assert forwarded("forwarded", ("Forwarded", 'for="203.0.113.7:_port"')) == (
        "203.0.113.7",
        "203.0.113.7",
    )
    assert forwarded("forwarded", (XFF, "203.0.113.7")) is None  # the other header: not read


@pytest.mark.parametrize(
    ("header", "value", "fragment"),
    [
        ("x-forwarded-for", "unknown", "'unknown' is not an address"),
        ("x-forwarded-for", "203.0.113.7\x85[31m", "'203.0.113.7\\x85[31m' is not an address"),
        ("x-forwarded-for", "203.0.113.7:http", "has an invalid port"),
        ("x-forwarded-for", "fe80::1%eth0", "is not an address"),
        ("x-forwarded-for", "[2001:db8::7", "is not an address"),
        ("forwarded", "for=unknown", "'unknown' is not an address"),
        ("forwarded", 'for="_gazonk"', "'_gazonk' is not an address"),
        ("forwarded", "proto=https", "has no for="),
        ("forwarded", 'for="[2001:db8::7]', "unterminated quote"),
    ],
)
def test_unreadable_entries_are_refused_naming_the_cause(
    header: str, value: str, fragment: str
) -> None:
    name = "Forwarded" if header == "forwarded" else XFF
    with pytest.raises(ForwardedError) as caught:
        forwarded(header, (name, value))
    assert fragment in str(caught.value) and escape(str(caught.value)) == str(caught.value)


# What websockets lets through as a header value: visible ASCII, space, tab, obs-text.
header_text = st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]) | st.just("\t"))


@given(header_text, st.sampled_from(["x-forwarded-for", "forwarded"]))
def test_any_header_value_is_a_client_or_a_clear_refusal(value: str, header: str) -> None:
    name = "Forwarded" if header == "forwarded" else XFF
    try:
        found = forwarded(header, (name, value))
    except ForwardedError as exc:
        assert escape(str(exc)) == str(exc)
        return
    assert found is None or found[0] in found[1].strip("[]") or found[1].startswith("[")


def test_networks_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(ConfigError, match="--proxy-protocol: 'haproxy' is not an address"):
        Config(target=TcpAddress("127.0.0.1", 1), proxy_protocol=("haproxy",))
    with pytest.raises(ConfigError, match=r"--trusted-proxy: '10\.0\.0\.0/33'"):
        Config(target=TcpAddress("127.0.0.1", 1), trusted_proxies=("10.0.0.0/33",))
    with pytest.raises(ConfigError, match="--trusted-proxy: 'uid:www-data' is not an address"):
        Config(target=TcpAddress("127.0.0.1", 1), trusted_proxies=("uid:www-data",))
    with pytest.raises(ConfigError, match="--forwarded-header: 'x-real-ip'"):
        Config(target=TcpAddress("127.0.0.1", 1), forwarded_header="x-real-ip")


def test_command_line_options() -> None:
    from trio_bridge.cli import build_parser, config_from_args

    def bridge(*argv: str) -> Config:
        return config_from_args(build_parser().parse_args([*argv, "6080", "vnc:5900"])).bridge

    config = bridge(
        "--proxy-protocol", "10.0.1.0/24, 10.0.2.7", "--proxy-protocol", "2001:db8::/48",
        "--trusted-proxy", "127.0.0.1", "--forwarded-header", "forwarded",
    )  # fmt: skip
    assert config.proxy_protocol == ("10.0.1.0/24", "10.0.2.7", "2001:db8::/48")
    assert (config.trusted_proxies, config.forwarded_header) == (("127.0.0.1",), "forwarded")
    assert bridge().forwarded_header == "x-forwarded-for" and bridge().proxy_protocol == ()
    with pytest.raises(ConfigError, match="--forwarded-header needs --trusted-proxy"):
        bridge("--forwarded-header", "forwarded")


# -- a bridge with a gate and a recorder, in this process --------------------------------------


class SeenGate:
    """A request gate that lets everyone in and remembers what it was told."""

    def __init__(self) -> None:
        self.seen: list[ClientInfo] = []

    async def check(self, request: Request, client: ClientInfo) -> None:
        self.seen.append(client)


class Running:
    def __init__(self, port: int, gate: SeenGate, recorder: Recorder) -> None:
        self.port, self.gate, self.recorder = port, gate, recorder


async def start_bridge(
    nursery: trio.Nursery,
    target: TcpTarget,
    record: Path,
    unix: Path | None = None,
    **fields: object,
) -> Running:
    """A bridge on 127.0.0.1 (or the Unix socket ``unix``) that limits every address
    (none exempt) to one connection."""
    limits = Limits(max_connections_per_address=1, handshake_timeout=5)
    config = Config(target=target.address, limits=limits, limit_exempt=(), **fields)  # type: ignore[arg-type]
    recorder: Recorder = await nursery.start(Recorder(record).run)
    gate = SeenGate()
    listener = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
    listener.bind(str(unix) if unix else ("127.0.0.1", 0))
    listener.listen(64)
    bridge = Bridge(config, observers=recorder, gates=[gate])
    await nursery.start(bridge.serve, [listener])
    return Running(0 if unix else listener.getsockname()[1], gate, recorder)


async def open_session(port: int, source: str, prefix: bytes = b"", **headers: str) -> RawClient:
    client = RawClient(await open_from(port, source))
    await client.send(prefix + ws_request(**headers))
    response = await client.read_response()
    assert response.status_code == 101, (response.status_code, response.body)
    return client


async def echo_and_close(client: RawClient) -> None:
    await client.send(client_frame(Opcode.BINARY, b"hello"))
    assert (await client.read_frame()).data == b"hello"
    await client.send(client_frame(Opcode.CLOSE, struct.pack("!H", 1000)))
    await client.read_close()
    await client.aclose()


async def refused_with(port: int, source: str, prefix: bytes = b"", **headers: str) -> int:
    client = RawClient(await open_from(port, source))
    await client.send(prefix + ws_request(**headers))
    response = await client.read_response()
    await client.aclose()
    return response.status_code


async def test_v1_header_names_the_client_everywhere(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40112 6080\r\n"
        first = await open_session(running.port, PROXY, header)
        # The limit counts 203.0.113.7, not the proxy: the same client again is refused,
        # another client through the same proxy is served.
        second = b"PROXY TCP4 203.0.113.7 127.0.0.1 40113 6080\r\n"
        assert await refused_with(running.port, PROXY, second) == 429
        await bridge_log.wait_for("client 203.0.113.7:40113: refused with 429")
        other = await open_session(running.port, PROXY, second.replace(b".7 ", b".8 "))
        await echo_and_close(first)
        await echo_and_close(other)
        paths = await running.recorder.wait_finished(2)
        ended = await bridge_log.wait_for("session", "ended: client=203.0.113.7:40112")
    recorded = {load_recording(path).meta.client for path in paths}
    assert recorded == {"203.0.113.7:40112", "203.0.113.8:40113"}
    assert ended.__dict__["CLIENT"] == "203.0.113.7:40112"  # the journald field
    assert [info.peer for info in running.gate.seen] == ["203.0.113.7:40112", "203.0.113.8:40113"]
    assert all(info.via and info.via.startswith(f"{PROXY}:") for info in running.gate.seen)


async def test_v2_local_keeps_the_proxy_as_the_client(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        client = await open_session(running.port, PROXY, v2_with(b"", command=0, family=0))
        await echo_and_close(client)
        (path,) = await running.recorder.wait_finished(1)
    assert load_recording(path).meta.client == client.local_address
    assert running.gate.seen[0].via is None


async def test_v2_ipv6_client_is_limited_per_64(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        first = await open_session(running.port, PROXY, v2_tcp6("2001:db8:1:2::7", 4711))
        # Another host of the same /64 is the same address for the limits.
        assert await refused_with(running.port, PROXY, v2_tcp6("2001:db8:1:2::8", 1)) == 429
        await bridge_log.wait_for("client [2001:db8:1:2::8]:1: refused with 429")
        await echo_and_close(first)
        await bridge_log.wait_for("ended: client=[2001:db8:1:2::7]:4711 ")
    assert running.gate.seen[0].peer == "[2001:db8:1:2::7]:4711"


async def test_tls_follows_the_header(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, pki: Pki
) -> None:
    """wss:// through a TCP load balancer: the header comes first, then the TLS bytes."""
    fields: dict[str, Any] = {"proxy_protocol": (PROXY,), "tls": pki.settings(ssl_only=True)}
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, **fields)
        stream = await open_from(running.port, PROXY)
        await stream.send_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40112 443\r\n")
        tls = trio.SSLStream(stream, pki.client_context(), server_hostname="127.0.0.1")
        await tls.send_all(ws_request())
        reply = await tls.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 101 "), reply
        await tls.aclose()
    assert running.gate.seen[0].peer == "203.0.113.7:40112" and running.gate.seen[0].tls


async def test_random_bytes_from_a_proxy_network_never_hurt_the_bridge(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    """The reader on a live socket: mutated, cut and trickled headers end in a served
    session or a closed connection, never an error, and the bridge keeps serving."""
    rng = random.Random(13)
    with trio.fail_after(30):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        for example in range(120):
            header = bytearray(rng.choice(VALID)[0])
            for _ in range(rng.randrange(3)):
                header[rng.randrange(len(header))] = rng.choice([rng.randrange(256), 0x30])
            cut = len(header) if example % 2 else rng.randrange(len(header) + 1)
            data = bytes(header[:cut]) + ws_request()
            stream = await open_from(running.port, PROXY)
            step = rng.choice([1, 7, len(data)])
            with contextlib.suppress(trio.BrokenResourceError):  # closed on a bad header
                for start in range(0, len(data), step):
                    await stream.send_all(data[start : start + step])
                await stream.send_eof()
            await read_all(stream)  # an answer or none; the connection ends either way
            await stream.aclose()
        await echo_and_close(await open_session(running.port, PROXY, VALID[0][0]))
    records = bridge_log.caplog.records
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
    refused = [r for r in records if "no valid PROXY protocol header" in r.getMessage()]
    assert refused and len(running.gate.seen) > 10  # both outcomes were reached


async def test_a_proxy_network_without_a_valid_header_is_closed_unanswered(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        client = RawClient(await open_from(running.port, PROXY))
        await client.send(ws_request())
        assert await client.read_to_eof() == b""  # not HTTP's to answer
        record = await bridge_log.wait_for("no valid PROXY protocol header")
        assert f"client {client.local_address}: closed" in record.getMessage()
        assert "the connection starts 'GET / HTTP/1.1\\x0d\\x0a" in record.getMessage()
        broken = RawClient(await open_from(running.port, PROXY))
        await broken.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 040112 6080\r\n" + ws_request())
        assert await broken.read_to_eof() == b""
        silent = RawClient(await open_from(running.port, PROXY))
        assert await silent.read_to_eof() == b""  # within the handshake budget (5 s)
        await bridge_log.wait_for(f"client {silent.local_address}: no PROXY protocol header within")
    assert echo_target.accepted == 0 and running.gate.seen == []


async def test_a_header_from_outside_the_proxy_networks_is_refused(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        spoofing = b"PROXY TCP4 203.0.113.7 127.0.0.1 40112 6080\r\n"
        assert await refused_with(running.port, CLIENT, spoofing) == 400
        await bridge_log.wait_for(f"client {CLIENT}:", "a PROXY protocol header from an address")
        assert await refused_with(running.port, CLIENT, v2_tcp4("203.0.113.7", 1)) == 400
        # Without a header, the same address is an ordinary client.
        await echo_and_close(await open_session(running.port, CLIENT))
    assert [info.peer.split(":")[0] for info in running.gate.seen] == [CLIENT]


async def test_forwarding_headers_only_from_trusted_proxies(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, trusted_proxies=(PROXY,))
        untrusted = await open_session(running.port, CLIENT, X_Forwarded_For="203.0.113.7")
        trusted = await open_session(running.port, PROXY, X_Forwarded_For="203.0.113.7")
        # One connection per address: 203.0.113.7 is taken, the proxy itself is not counted.
        status = await refused_with(running.port, PROXY, X_Forwarded_For="203.0.113.7")
        assert status == 429
        await bridge_log.wait_for("client 203.0.113.7: refused with 429")
        ignored = await open_session(running.port, PROXY, Forwarded="for=203.0.113.9")
        garbled = await open_session(running.port, PROXY, X_Forwarded_For="unknown")
        await bridge_log.wait_for("X-Forwarded-For ignored: X-Forwarded-For: 'unknown'")
        for client in (untrusted, trusted, ignored, garbled):
            await echo_and_close(client)
    peers = [info.peer for info in running.gate.seen]
    proxy_itself = [ignored.local_address, garbled.local_address]  # not limited, either
    assert peers == [untrusted.local_address, "203.0.113.7", *proxy_itself]
    assert [info.via for info in running.gate.seen][:2] == [None, trusted.local_address]


async def unix_upgrade(path: Path, prefix: bytes = b"", **headers: str) -> None:
    """One WebSocket upgrade over a Unix socket, closed once the 101 has arrived."""
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.connect(str(path))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(prefix + ws_request(**headers))
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = await stream.receive_some(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 101 "), reply


@pytest.mark.parametrize("option", ["proxy_protocol", "trusted_proxies"])
async def test_a_proxy_on_a_unix_socket_is_trusted_by_its_uid(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path, option: str
) -> None:
    """nginx or HAProxy on the same host, connecting to --unix-listen: uid:N."""
    path = tmp_path / "ws.sock"
    fields: dict[str, Any] = {option: (f"uid:{os.getuid()}",)}
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, unix=path, **fields)
        if option == "proxy_protocol":
            await unix_upgrade(path, b"PROXY TCP4 203.0.113.7 10.0.0.1 40112 80\r\n")
        else:
            await unix_upgrade(path, X_Forwarded_For="203.0.113.7:40112")
    (seen,) = running.gate.seen
    assert seen.peer == "203.0.113.7:40112" and seen.via and seen.via.startswith("unix(uid=")


async def test_rfc_7239_forwarded_when_chosen(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path
) -> None:
    fields: dict[str, Any] = {"trusted_proxies": (PROXY,), "forwarded_header": "forwarded"}
    with trio.fail_after(15):
        running = await start_bridge(nursery, echo_target, tmp_path, **fields)
        header = 'for=198.51.100.1, for="[2001:db8::7]:4711";proto=https'
        chosen = await open_session(running.port, PROXY, Forwarded=header)
        other = await open_session(running.port, PROXY, X_Forwarded_For="203.0.113.7")
        await echo_and_close(chosen)
        await echo_and_close(other)
    peers = [info.peer for info in running.gate.seen]
    assert peers == ["[2001:db8::7]:4711", other.local_address]


# -- real proxies --------------------------------------------------------------------------


def proxy_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: ./dev test installs it (apt)")
    return path


@asynccontextmanager
async def running_process(
    nursery: trio.Nursery, argv: list[str], pass_fds: tuple[int, ...] = ()
) -> AsyncIterator[ProcessLog]:
    """``argv`` with its stderr (and stdout) collected; terminated and reaped on exit."""
    output = await start_logged(
        nursery, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=pass_fds
    )
    process = output.process
    try:
        yield output
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


HAPROXY_TCP = """\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend websockets
    bind fd@{fd}
    default_backend bridge
backend bridge
    server bridge 127.0.0.1:{port} {send_proxy}
"""


@asynccontextmanager
async def haproxy(
    nursery: trio.Nursery, folder: Path, config: str, **values: object
) -> AsyncIterator[int]:
    """HAProxy with ``config``, its frontend on a socket bound here (``fd@``): it queues
    connections from the start, so no waiting for HAProxy to listen. Yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    path = folder / "haproxy.cfg"
    path.write_text(config.format(fd=listener.fileno(), **values))
    argv = [proxy_binary("haproxy"), "-db", "-f", str(path)]
    try:
        async with running_process(nursery, argv, pass_fds=(listener.fileno(),)):
            yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_names_the_client(
    nursery: trio.Nursery,
    echo_target: TcpTarget,
    tmp_path: Path,
    bridge_log: LogWaiter,
    send_proxy: str,
) -> None:
    with trio.fail_after(20):
        running = await start_bridge(nursery, echo_target, tmp_path, proxy_protocol=(PROXY,))
        async with haproxy(
            nursery, tmp_path, HAPROXY_TCP, port=running.port, send_proxy=send_proxy
        ) as port:
            first = await open_session(port, CLIENT)
            assert await refused_with(port, CLIENT) == 429  # the client's limit, not HAProxy's
            await bridge_log.wait_for(f"client {CLIENT}:", "refused with 429")
            other = await open_session(port, NEIGHBOUR)
            await echo_and_close(first)
            await echo_and_close(other)
            paths = await running.recorder.wait_finished(2)
            await bridge_log.wait_for("session", f"ended: client={NEIGHBOUR}:")
    assert {load_recording(path).meta.client.split(":")[0] for path in paths} == {CLIENT, NEIGHBOUR}
    assert [
        (info.peer.split(":")[0], info.via.split(":")[0]) for info in running.gate.seen if info.via
    ] == [
        (CLIENT, PROXY),
        (NEIGHBOUR, PROXY),
    ]


NGINX = """\
{user}
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{bridge};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            {forwarding}
        }}
    }}
}}
"""


async def wait_listening(port: int, process: ProcessLog) -> None:
    """Until ``port`` accepts. nginx says nothing when it is ready, so this polls, a
    connection attempt every 20 ms; the caller bounds the time."""
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            if process.ended:
                raise AssertionError(f"nginx exited:\n{process.text.decode()}") from None
            await trio.sleep(0.02)
            continue
        await stream.aclose()
        return


# How nginx appends the client to each header. For Forwarded it has no variable of its
# own: an absent header leaves an empty first element, which lists may hold.
NGINX_FORWARDING = {
    "x-forwarded-for": "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "forwarded": 'proxy_set_header Forwarded "$http_forwarded, for=$remote_addr";',
}


@asynccontextmanager
async def nginx(
    nursery: trio.Nursery, folder: Path, bridge_port: int, header: str
) -> AsyncIterator[int]:
    """nginx as a WebSocket reverse proxy to the bridge, run as the current user."""
    prefix = folder / "nginx"
    prefix.mkdir()
    port = free_port()
    # As root, nginx would hand its worker to "nobody", who cannot enter tmp_path.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    (prefix / "nginx.conf").write_text(
        NGINX.format(
            user=user,
            prefix=prefix,
            port=port,
            bridge=bridge_port,
            forwarding=NGINX_FORWARDING[header],
        )
    )
    directives = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"
    argv = [
        proxy_binary("nginx"),
        "-p",
        str(prefix),
        "-c",
        "nginx.conf",
        "-e",
        "stderr",
        "-g",
        directives,
    ]
    async with running_process(nursery, argv) as process:
        await wait_listening(port, process)
        yield port


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
async def test_nginx_names_the_client(
    nursery: trio.Nursery,
    echo_target: TcpTarget,
    tmp_path: Path,
    bridge_log: LogWaiter,
    header: str,
) -> None:
    fields: dict[str, Any] = {"trusted_proxies": (PROXY,), "forwarded_header": header}
    # The client's own header is kept by nginx, left of the address it adds; the other
    # header, which nginx passes on untouched, is not read at all.
    with trio.fail_after(20):
        running = await start_bridge(nursery, echo_target, tmp_path, **fields)
        async with nginx(nursery, tmp_path, running.port, header) as port:
            spoofs = {"X_Forwarded_For": "198.51.100.1", "Forwarded": "for=198.51.100.2"}
            first = await open_session(port, CLIENT, b"", **spoofs)
            assert await refused_with(port, CLIENT) == 429
            await bridge_log.wait_for(f"client {CLIENT}: refused with 429")
            other = await open_session(port, NEIGHBOUR)
            await echo_and_close(first)
            await echo_and_close(other)
            paths = await running.recorder.wait_finished(2)
            await bridge_log.wait_for("session", f"ended: client={NEIGHBOUR} ")
    assert {load_recording(path).meta.client for path in paths} == {CLIENT, NEIGHBOUR}
    assert [info.peer for info in running.gate.seen] == [CLIENT, NEIGHBOUR]
    assert all(info.via and info.via.startswith(f"{PROXY}:") for info in running.gate.seen)


# -- docs/scaling.md's example, as written there ---------------------------------------------


def doc_block(text: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", text, re.DOTALL)
    assert match is not None, f"no {language} block in docs/scaling.md"
    return match.group(1)


def ported(text: str, ports: dict[int, int]) -> str:
    """``text`` with the example's port numbers replaced (and nothing else)."""
    return re.sub(r"(?<=:)(\d{4})\b", lambda m: str(ports.get(int(m.group(1)), m.group(1))), text)


BRIDGE_CODE = "import sys; from trio_bridge.cli import main; sys.exit(main())"
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
HEALTH_CHECKED = re.compile(rb"client 127\.0\.0\.1:\d+: GET /healthz -> 200")


async def served_by(logs: list[ProcessLog], client: RawClient) -> int:
    """Which bridge logged the end of ``client``'s session."""
    ended = re.compile(rb"session \S+ ended: client=%s " % client.local_address.encode())
    found: list[int] = []
    async with trio.open_nursery() as nursery:

        async def watch(index: int, log: ProcessLog) -> None:
            try:
                await log.wait_for(ended)
            except AssertionError:  # that bridge exited without it
                return
            found.append(index)
            nursery.cancel_scope.cancel()

        for index, log in enumerate(logs):
            if not log.ended:
                nursery.start_soon(watch, index, log)
    return found[0]


async def test_scaling_example_survives_a_bridge_killed(
    nursery: trio.Nursery, echo_target: TcpTarget, tmp_path: Path
) -> None:
    """Two bridges behind HAProxy, one Redis: kill one, new sessions reach the other."""
    from trio_bridge.tokens.resp import RedisConnection

    page = (DOCS / "scaling.md").read_text()
    text = page[page.index("## Two bridges behind HAProxy") :]
    commands = [
        line for line in doc_block(text, "sh").splitlines() if line.startswith("trio-bridge ")
    ]
    assert len(commands) == 2
    redis_port, front = free_port(), free_port()
    path = "/?token=desk-42"
    with trio.fail_after(40):
        async with redis_server(tmp_path / "redis", redis_port):
            redis = await RedisConnection.open(TcpAddress("127.0.0.1", redis_port))
            assert await redis.call("SET", "desk-42", str(echo_target.address)) == b"OK"
            await redis.aclose()
            async with bridges(nursery, commands, redis_port) as (logs, ports):
                config = ported(
                    doc_block(text, "haproxy"), {6080: front, 6081: ports[0], 6082: ports[1]}
                )
                async with running_process(
                    nursery,
                    [proxy_binary("haproxy"), "-db", "-f", str(config_file(tmp_path, config))],
                ):
                    # HAProxy binds before it checks: both checked means it listens.
                    for log in logs:
                        await log.wait_for(HEALTH_CHECKED)
                    # Two sessions at once: least connections puts one on each bridge.
                    both = [await open_session(front, "127.0.0.5", path=path) for _ in range(2)]
                    for client in both:
                        await echo_and_close(client)
                    assert sorted([await served_by(logs, client) for client in both]) == [0, 1]
                    logs[0].process.send_signal(signal.SIGKILL)
                    await logs[0].process.wait()
                    for _ in range(4):
                        client = await open_session(front, "127.0.0.5", path=path)
                        await echo_and_close(client)
                        assert await served_by(logs, client) == 1
    assert echo_target.accepted == 6


def config_file(folder: Path, text: str) -> Path:
    path = folder / "haproxy.cfg"
    path.write_text(text)
    return path


@asynccontextmanager
async def bridges(
    nursery: trio.Nursery, commands: list[str], redis_port: int
) -> AsyncIterator[tuple[list[ProcessLog], list[int]]]:
    """The doc's bridges, on ports the kernel picks (its 6081 and 6082 may be taken)."""
    async with (
        running_process(nursery, bridge_argv(commands[0], redis_port)) as first,
        running_process(nursery, bridge_argv(commands[1], redis_port)) as second,
    ):
        logs = [first, second]
        ports = [int((await log.wait_for(LISTENING)).group(1)) for log in logs]
        yield logs, ports


def bridge_argv(command: str, redis_port: int) -> list[str]:
    argv = shlex.split(ported(command, {6379: redis_port, 6081: 0, 6082: 0}))
    assert argv[0] == "trio-bridge"
    return [sys.executable, "-c", BRIDGE_CODE, *argv[1:]]
