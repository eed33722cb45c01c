"""Property-based fuzz of every front door (hypothesis): requests, then frames.

The doors are what the command line runs (``trio_bridge.addons.Addons`` around a
``Bridge``): ``--web`` with listing and ``--web-auth`` behind Basic auth and an Origin
allowlist, ``/healthz``, the ``--metrics`` port, each token mode (TokenFile from the
query, the path and Host; TokenFileName; TokenRedis on a real redis-server; JWT; two
operator plugins that answer with wrong types), TLS, compression and recording.

For every example, whatever the bytes sent:

- the bridge is still serving: it did not crash, and the WebSocket session each door
  opened before the examples still echoes a fresh message byte for byte;
- the answer is a well-formed HTTP response (then frames, after a 101) or a clean close;
- nothing is logged at ERROR or with a traceback, except one line when a test plugin
  failed on purpose, and then the client got 500;
- no target outside the allowed ones is ever connected to.

A door that crashed is restarted before the next example, so hypothesis shrinks each
crash to its own minimal example. The bridges run in a Trio event loop on a background
thread for the whole module (tests/fuzz_support.py).
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from .conftest import WS_KEY, ws_request
from .fuzz_support import (
    GOOD_ORIGIN,
    IDNA_HOST,
    LONG_UNIX,
    MAX_MESSAGE,
    PASSWORD,
    USER,
    WEB_PATHS,
    Door,
    Harness,
    HttpAnswer,
    Malformed,
    RawFrame,
    deflate,
    describe,
    harness,
    parse_http,
    parse_server_frames,
)

REQUEST_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FRAME_EXAMPLES = int(os.environ.get("FUZZ_FRAME_EXAMPLES", "50"))
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=False,
)
DOORS = [
    "web", "health", "metrics", "query", "path", "host", "folder", "redis", "jwt",
    "plugin", "blocking-plugin", "tls", "compression", "recording",
]  # fmt: skip
WS_DOORS = [name for name in DOORS if name != "metrics"]


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with harness(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


# -- what hypothesis sends ----------------------------------------------------------------

# Bytes that mean something to a parser, a decoder or a log line.
SPECIAL_BYTES = b"\x00\x01\t\n\r\x1b\x7f\x80\xc3\xa4\xed\xa0\xff %?#&=/\\:;,.\"'<>[]*"
# Every header the bridge reads (grep headers.get / get_all), and those websockets reads.
READ_HEADERS = [
    "Host", "Origin", "Authorization", "If-None-Match", "If-Modified-Since", "Upgrade",
    "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions", "Content-Length", "Transfer-Encoding", "X-Forwarded-For",
]  # fmt: skip
GOOD_BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
HEADER_VALUES = [
    "good", "evil", "127.0.0.1", "localhost:22", "[::1]:80", "[::1", "unix:/etc/passwd",
    "websocket", "WebSocket, h2c", "Upgrade", "keep-alive, Upgrade", WS_KEY, "AAAA", "13", "8",
    "binary", "base64", "binary, base64", GOOD_ORIGIN, "https://evil.example", "null",
    GOOD_BASIC, "Basic !!", "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
    "Basic " + base64.b64encode("üser:pässword".encode()).decode(), "Bearer x", "*", '"x"',
    'W/"1-2", "3"', "Thu, 01 Jan 1970 00:00:00 GMT", "Sat, 01 Jan 2000 00:00:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT", "-1", "0", "1", "chunked",
    "permessage-deflate", "permessage-deflate; client_max_window_bits",
    "permessage-deflate; server_max_window_bits=8", "permessage-deflate; foo=bar", "x-ext",
    "", " ",
]  # fmt: skip
JWT_HOSTS: list[object] = [
    "127.0.0.1", IDNA_HOST, "\x00.example", "a\x7f.example", "\udcff.example", "-.example",
    "a" * 64 + ".example", "..example", "127.0.0.1\x00.example", f"unix:{LONG_UNIX}",
    "", 5, None, ["127.0.0.1"], {"host": "x"},
]  # fmt: skip


def raw(max_size: int) -> st.SearchStrategy[bytes]:
    """Bytes with a bias to the interesting ones (control, non-ASCII, separators)."""
    special = st.sampled_from([bytes([b]) for b in SPECIAL_BYTES])
    return st.lists(special | st.binary(min_size=1, max_size=3), max_size=max_size).map(b"".join)


def field_value() -> st.SearchStrategy[bytes]:
    known = st.sampled_from(HEADER_VALUES).map(lambda v: v.encode("utf-8", "surrogatepass"))
    return known | raw(12)


def jwt_tokens(h: Harness) -> st.SearchStrategy[str]:
    assert h.allowed is not None and h.forbidden is not None
    ports: list[object] = [
        h.allowed.address.port, str(h.allowed.address.port), h.forbidden.address.port,
        h.closed_port, 0, -1, 70000, 1 << 70, 5900.5, "x", None, True, [1],
    ]  # fmt: skip
    times = st.sampled_from([None, 0, 1, int(time.time()) + 3600, "soon", 1e300])
    claims = st.fixed_dictionaries(
        {},
        optional={
            "host": st.sampled_from(JWT_HOSTS),
            "port": st.sampled_from(ports),
            "exp": times,
            "nbf": times,
            "aud": st.just("x"),
        },
    )
    good = {"host": h.allowed.address.host, "port": h.allowed.address.port}
    signed = st.one_of(st.just(good), claims).map(h.sign)
    forged = claims.map(lambda c: h.sign(c)[:-4] + "AAAA")
    return signed | forged | st.sampled_from(["not.a.jwt", "a.b", "..", "e30.e30.", "x" * 5000])


@st.composite
def requests(draw: st.DrawFn, h: Harness, door: Door) -> tuple[bytes, str]:
    """A request shaped for ``door`` (its tokens, its files), with its method.

    Each example picks what to disturb, so that a good share of requests is a valid
    handshake or file request carrying one odd thing (a token whose target is
    unusable, a repeated header, a control character in the query) and reaches the
    routing, auth, file and relay code; the rest disturb everything, for the parser.
    """
    mode = draw(st.sampled_from(["token", "token", "headers", "target", "wild"]))
    if mode == "wild" and draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300)) + b"\r\n\r\n", "?"
    method = "GET"
    if mode == "wild" or draw(st.integers(0, 7)) == 0:
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "get", "GET "]))
    name = door.name
    token: bytes | None = None
    if door.tokens:
        known = st.sampled_from(door.tokens).map(str.encode)
        token = draw(known if mode != "wild" else known | raw(8))
    elif name == "jwt":
        token = draw(jwt_tokens(h)).encode("utf-8", "surrogatepass")
    headers: list[tuple[bytes, bytes]] = [
        (b"Host", b"127.0.0.1"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", WS_KEY.encode()),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Protocol", b"binary"),
        *[(k.encode(), v.encode()) for k, v in door.ws_headers.items() if k != "Host"],
    ]
    if name == "host":
        headers[0] = (b"Host", (token or b"") + draw(st.sampled_from([b"", b":6080", b":"])))
        path = b"/"
    elif name == "path":
        path = b"/websockify/" + (token or b"")
    elif token is not None:
        path = b"/?token=" + token
    else:
        path = draw(st.sampled_from(WEB_PATHS)).encode()
    if name in ("web", "health", "metrics") and draw(st.booleans()):
        headers = [(k, v) for k, v in headers if k != b"Upgrade"]  # a plain HTTP request
    if door.deflate and draw(st.booleans()):
        headers.append((b"Sec-WebSocket-Extensions", b"permessage-deflate"))
    if mode in ("target", "wild"):
        # The request target with raw bytes and a query in odd places.
        if draw(st.booleans()):
            path += draw(st.sampled_from([b"?", b"&", b"#", b"/", b""])) + draw(raw(10))
        if draw(st.booleans()):
            pairs = draw(st.lists(st.tuples(raw(4), raw(8)), max_size=3))
            path += b"?" + b"&".join(key + b"=" + value for key, value in pairs)
    if mode in ("headers", "wild"):
        if draw(st.booleans()):  # every header the code reads, twice
            header = draw(st.sampled_from(READ_HEADERS)).encode()
            same = [v for k, v in headers if k.lower() == header.lower()]
            headers += [
                (header, same[0] if same else draw(field_value())),
                (header, draw(field_value())),
            ]
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            if headers:
                headers.pop(draw(st.integers(0, len(headers) - 1)))
        names = st.sampled_from(READ_HEADERS).map(str.encode) | raw(6)
        for _ in range(draw(st.integers(0, 3))):
            header = draw(names)
            if draw(st.booleans()):  # a second copy of a header already there
                same = [v for k, v in headers if k.lower() == header.lower()]
                value = same[0] if same else draw(field_value())
            else:
                value = draw(field_value())
            headers.append((header, value))
    version = b"HTTP/1.1"
    if mode == "wild":
        if draw(st.integers(0, 3)) == 0:
            headers = draw(st.permutations(headers))
        if draw(st.integers(0, 4)) == 0:
            version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"http/1.1", b""]))
    lines = [method.encode() + b" " + path + b" " + version]
    lines += [key + b": " + value for key, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n", method


# -- talking to a door (blocking, from the test thread) ------------------------------------

CLOSE_1000 = RawFrame(8, b"\x03\xe8").serialize()


def exchange(
    h: Harness, door: Door, request: bytes, *, head: bool, tls: bool, port: int
) -> tuple[bytes, bool]:
    """Send ``request``, read to EOF; returns the bytes and whether the end was a reset.

    A plain connection is half-closed after the request. TLS cannot half-close, so
    after a 101 it sends a close frame instead; the bridge ends every other answer
    with its own EOF.
    """
    sock = h.connect(door, port=port, tls=tls)
    with sock:
        try:
            sock.sendall(request)
            if not tls:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the bridge already answered and closed: read what it said
        data = bytearray()
        closing = complete = False
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return bytes(data), True
            except TimeoutError:
                if complete:  # TLS: nothing more came after a complete answer
                    return bytes(data), False
                raise AssertionError(
                    f"no end of the answer within 10 s: {bytes(data)[:300]!r}"
                ) from None
            if not chunk:
                return bytes(data), False
            data += chunk
            if tls and not closing:
                try:
                    answer = parse_http(bytes(data), head=head)
                except Malformed:
                    answer = None
                if answer is not None and answer.status == 101:
                    closing = True
                    sock.sendall(CLOSE_1000)
                elif answer is not None:
                    # The bridge waits for an EOF that TLS cannot half-close: anything
                    # more would come at once.
                    complete = True
                    sock.settimeout(0.05)


def ensure_up(h: Harness, door: Door) -> None:
    """Restart a door that an earlier example crashed, then forget old log lines."""
    assert h.failure is None, h.failure
    if not h.alive(door):
        h.restart(door)
    h.settle(door)
    h.log.take()


# ERROR lines (no traceback) for faults the test made on purpose -> the client's status.
OPERATOR_FAULTS = {
    "names an unusable target": {502},
    "unusable value for token": {404},
    "does not hold one target": {404},
}
PLUGIN_FAULTS = {
    "token plugin": {500},
    "checking the request failed": {500},
    "token lookup failed": {503},
}


def check_afterwards(h: Harness, door: Door, status: int | None) -> None:
    """The properties every example must leave true (see the module docstring)."""
    h.settle(door)
    assert door.failure is None, f"the {door.name} bridge crashed:\n{door.failure_text()}"
    assert h.forbidden is not None and h.forbidden.accepted == 0, "connected to a forbidden target"
    try:
        h.check_held(door)
    except Exception as exc:
        deadline = time.monotonic() + 2
        while door.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the bridge's crash is still unwinding: report it
        assert door.failure is None, f"the {door.name} bridge crashed:\n{door.failure_text()}"
        raise AssertionError(
            f"the session held open on {door.name} stopped relaying: {exc!r}"
        ) from exc
    if door.http_port == "metrics":
        check_metrics_alive(h, door)
    records = h.log.take()
    for record in records:
        note(describe(record))
    bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    faults = dict(OPERATOR_FAULTS, **(PLUGIN_FAULTS if door.plugin_errors else {}))
    deliberate = [
        r
        for r in bad
        if any(f in r.getMessage() and status in codes for f, codes in faults.items())
        and (r.exc_info is None or door.plugin_errors)
    ]
    # A fault the test made on purpose (a plugin's, or in the operator's data) is logged
    # once, and the client got the matching status; any other ERROR or traceback is a bug.
    assert len(deliberate) <= 1, "\n".join(describe(r) for r in deliberate)
    bad = [r for r in bad if r not in deliberate]
    assert not bad, "\n".join(describe(r) for r in bad)


def check_metrics_alive(h: Harness, door: Door) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    data, _ = exchange(h, door, request, head=False, tls=False, port=door.metrics_port)
    answer = parse_http(data)
    assert answer is not None and answer.status == 200, data[:300]
    assert b"trio_bridge_sessions_open" in answer.body


PARSER_REFUSALS = {400, 414, 431, 501, 505}  # answers to a request that did not parse


def check_answer(door: Door, data: bytes, reset: bool, head: bool) -> HttpAnswer | None:
    assert not reset, f"the bridge reset the connection instead of closing it: {data[:300]!r}"
    if not data:
        return None
    answer = parse_http(data, head=head)
    assert answer is not None, f"incomplete HTTP response: {data[:300]!r}"
    if head and answer.rest and answer.status in PARSER_REFUSALS:
        # The request did not parse, so the bridge cannot know it was a HEAD: its
        # refusal has the body its Content-Length announces.
        answer = parse_http(data) or answer
    status = answer.status
    allowed = {101, 200, 301, 304, 501, 505} | set(range(400, 500))
    if door.tokens or door.name == "jwt":
        allowed.add(502)  # the operator's data names an unusable target
    if door.plugin_errors:
        allowed |= {500, 503}
    assert status in allowed, (status, answer.body[:300])
    if status == 101:
        assert door.http_port != "metrics"
        parse_server_frames(answer.rest, deflate=door.deflate)
    else:
        assert answer.rest == b"", f"bytes after a {status} response: {answer.rest[:100]!r}"
    return answer


def fuzz(check: Callable[[Harness, str, st.DataObject], None], examples: int, name: str) -> Any:
    """``check`` as a hypothesis test for door ``name``; TLS examples cost a handshake
    and a wait for an EOF TLS cannot send, so that door gets a third of them."""
    count = max(1, examples // 3) if name == "tls" else examples
    return settings(FUZZ_SETTINGS, max_examples=count)(given(data=st.data())(check))


def _requests_property(doors: Harness, name: str, data: st.DataObject) -> None:
    h, door = doors, doors.doors[name]
    ensure_up(h, door)
    request, method = data.draw(requests(h, door), label="request")
    tls = door.tls and data.draw(st.integers(0, 4), label="tls") > 0
    port = door.metrics_port if door.http_port == "metrics" else door.port
    head = method == "HEAD"
    raw_answer, reset = exchange(h, door, request, head=head, tls=tls, port=port)
    note(f"answer: {raw_answer[:400]!r}")
    status: int | None = None
    try:
        answer = check_answer(door, raw_answer, reset, head)
        status = answer.status if answer is not None else None
        event(f"HTTP {status}" if status else "closed without an answer")
    finally:
        check_afterwards(h, door, status)


# Doors with defects the fuzz still finds; each reason names the minimal example.
KNOWN_REQUEST_DEFECTS: dict[str, str] = {}


def doors_marked(names: Iterable[str], known: dict[str, str]) -> list[Any]:
    """``names`` as parameters, those with a known defect marked strict xfail."""
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=known[n])) if n in known else n
        for n in names
    ]


@pytest.mark.parametrize("name", doors_marked(DOORS, KNOWN_REQUEST_DEFECTS))
def test_every_request_gets_an_answer_or_a_clean_close(doors: Harness, name: str) -> None:
    fuzz(_requests_property, REQUEST_EXAMPLES, name)(doors, name)


# -- frames after the upgrade -----------------------------------------------------------------

CLOSE_CODES = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1015, 1016, 0, 999,
               2999, 3000, 4999, 5000, 65535]  # fmt: skip
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xc0\xaf", b"\xe2\x82"]


def close_payloads() -> st.SearchStrategy[bytes]:
    reasons = (
        st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))
        | st.sampled_from(BAD_UTF8)
        | st.sampled_from([b"r" * 123, b"r" * 124, "é".encode() * 62])
    )
    coded = st.builds(lambda c, r: c.to_bytes(2, "big") + r, st.sampled_from(CLOSE_CODES), reasons)
    return coded | st.sampled_from([b"", b"\x03"])


def payloads() -> st.SearchStrategy[bytes]:
    big = st.builds(
        lambda b, n: bytes([b]) * n,
        st.integers(0, 255),
        st.sampled_from([125, 126, 127, 65535, 65536, MAX_MESSAGE, MAX_MESSAGE + 1]),
    )
    return (
        st.binary(max_size=40)
        | st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))
        | st.sampled_from(BAD_UTF8)
        | big
    )


@st.composite
def frames(draw: st.DrawFn, compressed: bool) -> RawFrame:
    opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15))
    payload = draw(close_payloads() if opcode == 8 and draw(st.booleans()) else payloads())
    rsv = 0
    if compressed and draw(st.booleans()):
        rsv = 4
        payload = draw(
            st.sampled_from([deflate(payload), deflate(payload) + b"\xff\x00", payload[:7]])
        )
    elif draw(st.integers(0, 9)) == 0:
        rsv = draw(st.integers(1, 7))
    fin = draw(st.integers(0, 4)) > 0
    masked = draw(st.integers(0, 14)) > 0
    declared = None
    if draw(st.integers(0, 14)) == 0:
        declared = draw(st.sampled_from([len(payload) + 1, 126, 1 << 16, (1 << 63) - 1, 1 << 63]))
    return RawFrame(opcode, payload, fin=fin, rsv=rsv, masked=masked, declared=declared)


def fragmented(compressed: bool) -> st.SearchStrategy[list[RawFrame]]:
    """A message in fragments, with control frames or strays in between."""
    start = st.builds(lambda op, p: RawFrame(op, p, fin=False), st.sampled_from([1, 2]), payloads())
    middle = st.lists(
        st.builds(lambda p: RawFrame(0, p, fin=False), payloads())
        | st.builds(lambda p: RawFrame(9, p[:125]), payloads())
        | frames(compressed),
        max_size=3,
    )
    end = st.builds(lambda p: RawFrame(0, p), payloads() | st.sampled_from(BAD_UTF8))
    return st.builds(lambda s, m, e: [s, *m, e], start, middle, end)


def handshake(door: Door, deflate_offer: bool) -> bytes:
    extensions = {"Sec_WebSocket_Extensions": "permessage-deflate"} if deflate_offer else {}
    return ws_request(door.ws_path, **door.ws_headers, **extensions)


def read_until_answer(sock: socket.socket) -> tuple[HttpAnswer, bytes]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"no complete handshake answer: {data[:300]!r}"
        data += chunk
        answer = parse_http(data)
        if answer is not None:
            return answer, data


def read_to_eof(sock: socket.socket, data: bytes) -> tuple[bytes, bool]:
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data, True
        except TimeoutError:
            raise AssertionError(f"the bridge did not close within 10 s: {data[-200:]!r}") from None
        if not chunk:
            return data, False
        data += chunk


def _frames_property(doors: Harness, name: str, data: st.DataObject) -> None:
    h, door = doors, doors.doors[name]
    ensure_up(h, door)
    compressed = door.deflate
    pieces = st.lists(
        st.lists(frames(compressed), min_size=1, max_size=3) | fragmented(compressed),
        max_size=3,
    )
    sent = [frame for piece in data.draw(pieces, label="frames") for frame in piece]
    if door.tls:  # no half-close over TLS: no length the bridge would wait for in vain
        sent = [f for f in sent if f.declared is None or f.declared > MAX_MESSAGE]
    # A frame announcing more than is sent leaves the bridge waiting for the rest: only
    # the client's EOF ends that (as it would, going away).
    waiting = any(f.declared is not None and f.declared <= MAX_MESSAGE for f in sent)
    endings = ["close", "close-then-data", "eof", "close-eof"]
    if door.tls:
        endings = ["close"]
    elif waiting:
        endings = ["eof", "close-eof"]
    ending = data.draw(st.sampled_from(endings), label="ending")
    stream = b"".join(frame.serialize() for frame in sent)
    closes = [i for i, frame in enumerate(sent) if frame.opcode == 8]
    after_close = bool(closes) and closes[0] < len(sent) - 1
    if ending.startswith("close"):
        stream += CLOSE_1000
        after_close = after_close or bool(closes)
    if ending == "close-then-data":
        stream += RawFrame(2, b"after close").serialize()
        after_close = True
    status: int | None = None
    with h.connect(door) as sock:
        sock.sendall(handshake(door, compressed))
        answer, _ = read_until_answer(sock)
        status = answer.status
        assert status == 101, answer
        try:
            sock.sendall(stream)
            if ending.endswith("eof"):
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the bridge closed while we sent
            after_close = True
        received, reset = read_to_eof(sock, answer.rest)
    note(f"received: {received[:300]!r} ... {received[-200:]!r}")
    try:
        assert not reset or after_close, "the bridge reset the connection instead of closing it"
        got, _closed = parse_server_frames(received, deflate=door.deflate)
        event(f"{len(got)} frames back")
    finally:
        check_afterwards(h, door, status)


KNOWN_FRAME_DEFECTS: dict[str, str] = {}


@pytest.mark.parametrize("name", doors_marked(WS_DOORS, KNOWN_FRAME_DEFECTS))
def test_frames_after_the_upgrade_close_cleanly(doors: Harness, name: str) -> None:
    fuzz(_frames_property, FRAME_EXAMPLES, name)(doors, name)


def test_held_sessions_lasted_the_whole_run(doors: Harness) -> None:
    """Doors that never crashed still relay on the session opened before every example."""
    for door in doors.doors.values():
        if door.starts == 1:
            doors.check_held(door)


def test_no_forbidden_target_was_ever_connected(doors: Harness) -> None:
    assert doors.forbidden is not None and doors.forbidden.accepted == 0
