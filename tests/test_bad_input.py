"""Malformed handshakes and frames: each gets the right HTTP status or close code, is logged
with its cause, and leaves a concurrent healthy session relaying."""

from __future__ import annotations

import pytest
import trio
from websockets.frames import Opcode

from .conftest import (
    BridgeStarter,
    LogWaiter,
    RawClient,
    RunningBridge,
    TcpTarget,
    check_echo,
    client_frame,
    healthy_session,
    ws_request,
)

PLAIN_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n"
LONG = "x" * 10_000  # beyond websockets' 8 KiB line limit

# (request, status, header that must be in the response or None, text the body must contain,
#  fragments the bridge's log line must contain)
HTTP_CASES = {
    "plain_http_get": (
        PLAIN_GET,
        426,
        ("Upgrade", "websocket"),
        "WebSocket",
        ["426", "Connection"],
    ),
    "missing_key": (
        ws_request(Sec_WebSocket_Key=None),
        400,
        None,
        "Sec-WebSocket-Key",
        ["400", "Sec-WebSocket-Key"],
    ),
    "key_not_base64": (
        ws_request(Sec_WebSocket_Key="not base64 at all!"),
        400,
        None,
        "Sec-WebSocket-Key",
        ["400", "Sec-WebSocket-Key"],
    ),
    "key_wrong_length": (
        ws_request(Sec_WebSocket_Key="AAAAAAAA"),  # valid base64 of 6 bytes, not 16
        400,
        None,
        "Sec-WebSocket-Key",
        ["400", "Sec-WebSocket-Key"],
    ),
    "version_8": (
        ws_request(Sec_WebSocket_Version="8"),
        426,
        ("Sec-WebSocket-Version", "13"),
        "version 8",
        ["426", "version 8"],
    ),
    "base64_only": (
        ws_request(Sec_WebSocket_Protocol="base64"),
        400,
        None,
        "base64",
        ["400", "base64"],
    ),
    "unknown_subprotocol": (
        ws_request(Sec_WebSocket_Protocol="chat.example"),
        400,
        None,
        "chat.example",
        ["400", "chat.example"],
    ),
    "request_line_too_long": (ws_request("/" + LONG), 414, None, "", ["414"]),
    "header_line_too_long": (ws_request(X_Padding=LONG), 431, None, "", ["431"]),
}


async def _refused(running: RunningBridge, case: str) -> RawClient:
    """Send the case's request next to a healthy session; check the response and the close."""
    request, status, header, body_text, _ = HTTP_CASES[case]
    async with healthy_session(running.url):
        client = await RawClient.open(running.port)
        await client.send(request)
        response = await client.read_response()
        assert response.status_code == status, response
        if header is not None:
            assert response.headers.get(header[0]) == header[1]
        assert body_text.encode() in (response.body or b"")
        # the bridge closes the connection after the refusal
        assert await client.read_to_eof() == b""
        await client.aclose()
    return client


@pytest.mark.parametrize("case", list(HTTP_CASES))
async def test_bad_handshake_gets_http_error(bridge: RunningBridge, case: str) -> None:
    with trio.fail_after(10):
        await _refused(bridge, case)


@pytest.mark.parametrize("case", list(HTTP_CASES))
async def test_bad_handshake_is_logged_with_status_and_cause(
    bridge: RunningBridge, bridge_log: LogWaiter, case: str
) -> None:
    with trio.fail_after(10):
        client = await _refused(bridge, case)
        record = await bridge_log.wait_for(f"client {client.local_address}:")
    message = record.getMessage()
    for fragment in HTTP_CASES[case][4]:
        assert fragment in message
    assert record.levelname in ("INFO", "WARNING")


async def test_non_http_bytes_are_answered_400_and_logged(
    bridge: RunningBridge, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(10):
        async with healthy_session(bridge.url):
            client = await RawClient.open(bridge.port)
            await client.send(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
            answer = await client.read_to_eof()
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"unsupported protocol" in answer
            assert b"\x16" not in answer  # client bytes are escaped, not echoed raw
            await client.aclose()
            await bridge_log.wait_for(client.local_address, "bad HTTP request")


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        (b"Content-Length: 5\r\n", b"unsupported request body"),
        (b"Transfer-Encoding: chunked\r\n", b"transfer codings"),
    ],
)
async def test_a_request_with_a_body_is_answered_400_as_documented(
    bridge: RunningBridge, bridge_log: LogWaiter, extra: bytes, cause: bytes
) -> None:
    with trio.fail_after(10):
        client = await RawClient.open(bridge.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\nhello")
        answer = await client.read_to_eof()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert cause in answer
        await client.aclose()
        await bridge_log.wait_for(client.local_address, "refused with 400")


# -- frames after a successful handshake ------------------------------------------------

MAX_MESSAGE = 1024


def corrupt_first_byte(frame: bytes, *, set_bits: int = 0, opcode: int | None = None) -> bytes:
    first = frame[0] | set_bits
    if opcode is not None:
        first = (first & 0xF0) | opcode
    return bytes([first]) + frame[1:]


FRAME_CASES = {
    "unmasked": ([client_frame(Opcode.BINARY, b"hello", mask=False)], 1002),
    "rsv1": ([corrupt_first_byte(client_frame(Opcode.BINARY, b"hello"), set_bits=0x40)], 1002),
    "rsv2": ([corrupt_first_byte(client_frame(Opcode.BINARY, b"hello"), set_bits=0x20)], 1002),
    "rsv3": ([corrupt_first_byte(client_frame(Opcode.BINARY, b"hello"), set_bits=0x10)], 1002),
    "opcode_3": ([corrupt_first_byte(client_frame(Opcode.BINARY, b"hello"), opcode=0x3)], 1002),
    "opcode_b": ([corrupt_first_byte(client_frame(Opcode.PING, b"hello"), opcode=0xB)], 1002),
    # a ping with FIN=0: control frames must not be fragmented
    "fragmented_ping": ([bytes([0x09]) + client_frame(Opcode.PING, b"x")[1:]], 1002),
    "unexpected_continuation": ([client_frame(Opcode.CONT, b"x")], 1002),
    "oversized_message": ([client_frame(Opcode.BINARY, b"x" * (MAX_MESSAGE + 1))], 1009),
    "oversized_fragmented_message": (
        [
            client_frame(Opcode.BINARY, b"x" * 600, fin=False),
            client_frame(Opcode.CONT, b"x" * 600, fin=True),
        ],
        1009,
    ),
    "invalid_utf8_text": ([client_frame(Opcode.TEXT, b"ok \xff\xfe")], 1007),
    "truncated_utf8_text": ([client_frame(Opcode.TEXT, b"caf\xc3")], 1007),
    "invalid_utf8_in_later_fragment": (
        [
            client_frame(Opcode.TEXT, "héllo ".encode(), fin=False),
            client_frame(Opcode.CONT, b"fine ", fin=False),
            client_frame(Opcode.CONT, b"\xc3\x28", fin=True),
        ],
        1007,
    ),
}


async def _send_bad_frames(running: RunningBridge, frames: list[bytes]) -> tuple[RawClient, int]:
    client = await RawClient.open(running.port)
    await client.handshake()
    for frame in frames:
        await client.send(frame)
    close = await client.read_close()
    assert await client.read_to_eof() == b""  # and then the bridge closes the connection
    await client.aclose()
    return client, close.code


@pytest.mark.parametrize("case", list(FRAME_CASES))
async def test_bad_frame_gets_close_code(
    start_bridge: BridgeStarter, echo_target: TcpTarget, case: str
) -> None:
    frames, code = FRAME_CASES[case]
    running = await start_bridge(echo_target.address, max_message_size=MAX_MESSAGE)
    with trio.fail_after(10):
        async with healthy_session(running.url):
            _, received = await _send_bad_frames(running, frames)
            assert received == code


@pytest.mark.parametrize("case", list(FRAME_CASES))
async def test_bad_frame_close_code_in_session_log_line(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter, case: str
) -> None:
    frames, code = FRAME_CASES[case]
    running = await start_bridge(echo_target.address, max_message_size=MAX_MESSAGE)
    with trio.fail_after(10):
        client, received = await _send_bad_frames(running, frames)
        assert received == code
        record = await bridge_log.wait_for(
            "ended", f"client={client.local_address}", logger="trio_bridge.server"
        )
        assert f"close={code} by bridge" in record.getMessage()


async def test_utf8_character_split_across_fragments_is_accepted(bridge: RunningBridge) -> None:
    """The counterpart of the 1007 cases: a valid character split between fragments."""
    text = "naïve café ✓".encode()
    cut = text.index("✓".encode()) + 1  # inside the 3-byte character
    with trio.fail_after(10):
        client = await RawClient.open(bridge.port)
        await client.handshake()
        await client.send(client_frame(Opcode.TEXT, text[:cut], fin=False))
        await client.send(client_frame(Opcode.CONT, text[cut:], fin=True))
        echoed = b""
        while len(echoed) < len(text):
            frame = await client.read_frame()
            assert frame.opcode is Opcode.BINARY
            echoed += frame.data
        assert echoed == text
        await client.aclose()


# -- slow clients --------------------------------------------------------------------------


async def test_header_trickle_is_cut_at_handshake_timeout(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, handshake_timeout=1.5)
    request = ws_request()
    with trio.fail_after(10):
        async with healthy_session(running.url) as healthy:
            client = await RawClient.open(running.port)
            started = trio.current_time()
            closed = trio.Event()

            async def trickle() -> None:
                try:
                    for i in range(len(request)):
                        await client.send(request[i : i + 1])
                        await trio.sleep(1)  # the slow client's pace, not synchronisation
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async def watch_close() -> None:
                assert await client.read_to_eof() == b""
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                nursery.start_soon(watch_close)
                round_trips = 0
                while not closed.is_set():  # the healthy session relays all along
                    await check_echo(healthy, b"still here %d" % round_trips)
                    round_trips += 1
                closed_after = trio.current_time() - started
                nursery.cancel_scope.cancel()
            await client.aclose()
            assert 1.4 <= closed_after <= 2.5
            assert round_trips > 10
            await bridge_log.wait_for(client.local_address, "handshake not completed")
