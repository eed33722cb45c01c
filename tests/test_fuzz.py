"""Property-based fuzz of the request line, headers and query string (hypothesis).

For every input the bridge must answer with a well-formed HTTP response or close cleanly,
log no error or traceback, and never connect to a target that no rule allows.

The bridges run in a Trio event loop on a background thread for the whole module, so
hypothesis can drive plain blocking sockets from the test thread, many examples per
second, with shrinking working as usual.
"""

from __future__ import annotations

import logging
import os
import socket
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_bridge import Bridge, Config, Limits
from trio_bridge.auth import AuthSettings
from trio_bridge.tokens import TokenSettings

from .conftest import TcpTarget, echo, loopback_listener
from .security_support import parse_response

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UNSUPPORTED = {501, 505}  # what websockets answers a request it does not implement
CREDENTIALS = "fuzz:secret"


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


@dataclass
class Bridges:
    """Ports of bridges reading the token from the query, the path and Host, plus one
    with a fixed target behind Basic auth and an Origin allowlist."""

    ports: dict[str, int] = field(default_factory=dict)
    allowed: TcpTarget | None = None
    forbidden: TcpTarget | None = None
    log: LogRecords = field(default_factory=LogRecords)
    failure: BaseException | None = None


async def _run(bridges: Bridges, folder: Path, ready: threading.Event, stop: trio.Event) -> None:
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            allowed: TcpTarget = await nursery.start(TcpTarget(echo).serve)
            forbidden: TcpTarget = await nursery.start(TcpTarget(echo).serve)
            bridges.allowed, bridges.forbidden = allowed, forbidden
            token_file = folder / "tokens"
            token_file.write_text(f"good: {allowed.address}\nevil: {forbidden.address}\n")
            credentials = folder / "users"
            credentials.write_text(CREDENTIALS + "\n")
            credentials.chmod(0o600)
            limits = Limits(handshake_timeout=5, close_timeout=1)
            allow = (f"127.0.0.1:{allowed.address.port}",)
            configs = {
                where: Config(
                    target=None,
                    limits=limits,
                    tokens=TokenSettings("TokenFile", str(token_file), where),
                    allow_targets=allow,
                )
                for where in ("query", "path", "host")
            }
            configs["auth"] = Config(
                target=allowed.address,
                limits=limits,
                auth=(AuthSettings("BasicHTTPAuth", str(credentials)),),
                allow_origins=("https://good.example",),
            )
            for name, config in configs.items():
                listener = loopback_listener()
                bridges.ports[name] = listener.getsockname()[1]
                await nursery.start(Bridge(config).serve, [listener])
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def bridges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridges]:
    folder = tmp_path_factory.mktemp("fuzz")
    state = Bridges()
    logger = logging.getLogger("trio_bridge")
    logger.addHandler(state.log)
    ready = threading.Event()
    stop = trio.Event()
    token: list[trio.lowlevel.TrioToken] = []

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        await _run(state, folder, ready, stop)

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test, not lost in the thread
            state.failure = exc
            ready.set()

    worker = threading.Thread(target=thread, daemon=True)
    worker.start()
    assert ready.wait(30), "the bridges did not start"
    assert state.failure is None, state.failure
    yield state
    trio.from_thread.run_sync(stop.set, trio_token=token[0])
    worker.join(30)
    logger.removeHandler(state.log)
    assert state.failure is None, state.failure


# -- what hypothesis sends ----------------------------------------------------------------

TARGETISH = ["good", "evil", "127.0.0.1", "localhost:22", "[::1]:80", "unix:/etc/passwd"]
URL_CHARS = string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;=[]/?#"
VISIBLE = string.printable.strip() + " "
SPECIAL_PIECES = [*TARGETISH, "", "..", "%2e%2e", "%2F", "%00", "%0d%0a", "%ff", "websockify"]
HEADER_NAMES = [
    "Host",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Origin",
    "Authorization",
    "Content-Length",
    "Transfer-Encoding",
    "X-Forwarded-For",
]
HEADER_VALUES = [
    *TARGETISH,
    "good.example",
    "websocket",
    "Upgrade",
    WS_KEY,
    "13",
    "binary",
    "base64",
    "https://good.example",
    "Basic ZnV6ejpzZWNyZXQ=",  # fuzz:secret
    "Basic !!",
    "0",
    "chunked",
    "",
]


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request that is usually almost a WebSocket handshake, with parts mutated.

    Most requests keep to characters a request line and headers may hold, so that
    they reach the routing and auth code; one in five goes wild, for the parser.
    """
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=300)) + b"\r\n\r\n"
    wild = draw(st.integers(0, 4)) == 0

    def text(alphabet: str, max_size: int) -> st.SearchStrategy[str]:
        return st.text(max_size=max_size) if wild else st.text(alphabet, max_size=max_size)

    pieces = st.sampled_from(SPECIAL_PIECES) | text(URL_CHARS, 12)
    method = "GET" if not wild else draw(st.sampled_from(["GET", "POST", "HEAD", "get", "G ET"]))
    path = "/" + "/".join(draw(st.lists(pieces, max_size=4)))
    keys = st.sampled_from(["token", "Token", "target", "host", ""]) | text(URL_CHARS, 6)
    pairs = draw(st.lists(st.tuples(keys, pieces), max_size=3))
    if pairs:
        path += "?" + "&".join(f"{key}={value}" for key, value in pairs)
    version = "HTTP/1.1" if not wild else draw(st.sampled_from(["HTTP/1.0", "HTTP/2", "FOO"]))
    headers = {
        "Host": draw(st.sampled_from(["good", "evil", "127.0.0.1", "good.example:6080"])),
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": WS_KEY,
        "Sec-WebSocket-Version": "13",
        "Origin": draw(st.sampled_from(["https://good.example", "https://evil.example"])),
    }
    lines = [f"{name}: {value}" for name, value in headers.items()]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        lines.pop(draw(st.integers(0, len(lines) - 1)))
    names = st.sampled_from(HEADER_NAMES) | text(string.ascii_letters + "-", 10)
    values = st.sampled_from(HEADER_VALUES) | text(VISIBLE, 40)
    extra = draw(st.lists(st.tuples(names, values), max_size=4))
    lines += [f"{name}: {value}" for name, value in extra]
    return _text(f"{method} {path} {version}\r\n" + "\r\n".join(lines) + "\r\n\r\n")


def exchange_blocking(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send, half-close, read to EOF; returns the bytes and whether the end was a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the bridge already answered and closed: read what it said
        data = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(data), True
            if not chunk:
                return bytes(data), False
            data += chunk


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests(), which=st.sampled_from(["query", "path", "host", "auth"]))
def test_every_request_gets_an_answer_or_a_clean_close(
    bridges: Bridges, request: bytes, which: str
) -> None:
    assert bridges.forbidden is not None
    data, reset = exchange_blocking(bridges.ports[which], request)
    assert not reset, "the bridge reset the connection instead of closing it"
    if not data:
        event(f"{which}: closed without an answer")
    else:
        response = parse_response(data)
        # 101, or a refusal of what the client sent; never a server failure
        status = response.status_code
        assert status == 101 or 400 <= status < 500 or status in UNSUPPORTED, (status, response)
        event(f"{which}: HTTP {status}")
        if status == 101:
            assert which == "auth" or b"good" in request.lower()
    assert bridges.forbidden.accepted == 0, "connected to a target no rule allows"
    assert not bridges.log.bad, [record.getMessage() for record in bridges.log.bad]


def test_the_bridges_still_relay_after_the_fuzz(bridges: Bridges) -> None:
    request = (
        "GET /?token=good HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    data, reset = exchange_blocking(bridges.ports["query"], request)
    assert not reset
    assert parse_response(data).status_code == 101
    assert bridges.forbidden is not None and bridges.forbidden.accepted == 0

