"""Token lookup over HTTP (websockify's BaseTokenAPI and JSONTokenApi) against a real HTTP
API: a stdlib HTTP server on 127.0.0.1 in a thread, answering per token, and able to
fail (500), stall, redirect, answer too much or go away. Bridges are real, on loopback
ports, driven with websockets' client; log lines are read from caplog.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio

from trio_bridge.config import Config, ConfigError, TcpAddress, TokenSettings, UnixAddress
from trio_bridge.server import Bridge
from trio_bridge.tokens import TokenRouter, load_token_plugin
from trio_bridge.tokens.base import describe_token
from trio_bridge.tokens.http_api import MAX_ANSWER, JsonTokenApi, TokenApi

from .conftest import (
    BridgeStarter,
    LogWaiter,
    RunningBridge,
    StartTarget,
    TcpTarget,
    echo,
    free_port,
    loopback_listener,
)
from .test_tokens import refused, relays

SECRET = "s3cret-Token_value.42"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class TokenApiServer:
    """A real HTTP/1.1 token API on 127.0.0.1: ``answers`` by request path (with query),
    404 otherwise. ``stall`` holds every request until :meth:`close`; ``paths`` and
    ``connections`` record what the bridge did."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.paths: list[str] = []
        self.connections = 0
        self.connection_closed = threading.Event()
        self.stall = False
        self.released = threading.Event()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse shows

            def setup(self) -> None:
                api.connections += 1
                super().setup()

            def finish(self) -> None:
                super().finish()
                api.connection_closed.set()

            def do_GET(self) -> None:
                api.paths.append(self.path)
                if api.stall:
                    api.released.wait(30)
                answer = api.answers.get(self.path, Answer(404, b"not found"))
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def json(self, path: str, target: object, status: int = 200) -> None:
        self.answers[path] = Answer(status, json.dumps(target).encode())

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[TokenApiServer]:
    server = TokenApiServer()
    yield server
    server.close()


async def bridge_with(nursery: trio.Nursery, plugin: TokenApi) -> RunningBridge:
    """A bridge routing by ``plugin`` as built here (a short timeout, say)."""
    listener = loopback_listener()
    bridge = Bridge(Config(target=None), resolver=TokenRouter(plugin))
    await nursery.start(bridge.serve, [listener])
    return RunningBridge(bridge, listener.getsockname()[1])


def lookup_failures(bridge_log: LogWaiter) -> list[str]:
    return [
        record.getMessage()
        for record in bridge_log.caplog.records
        if record.levelno == logging.ERROR and "token lookup failed" in record.getMessage()
    ]


# -- answers ------------------------------------------------------------------------------


async def test_json_and_text_apis_route_tokens_by_websockify_names(
    start_bridge: BridgeStarter, start_target: StartTarget, api: TokenApiServer
) -> None:
    a, b = await start_target(echo), await start_target(echo)
    api.json("/json/vm-a", {"host": "127.0.0.1", "port": a.address.port})
    api.json("/json/vm-b", {"host": "127.0.0.1", "port": str(b.address.port), "note": "x"})
    api.answers["/text/vm-a?v=1"] = Answer(body=f"127.0.0.1:{a.address.port}\n".encode())
    by_json = await start_bridge(None, tokens=TokenSettings("JSONTokenApi", api.url("/json/%s")))
    by_text = await start_bridge(
        None,
        tokens=TokenSettings("websockify.token_plugins.BaseTokenAPI", api.url("/text/%s?v=1")),
    )
    with trio.fail_after(10):
        await relays(by_json, "/?token=vm-a")
        await relays(by_json, "/?token=vm-b")
        await relays(by_text, "/?token=vm-a")
        assert (a.accepted, b.accepted) == (2, 1)
        await refused(by_json, "/?token=vm-c", 404, "Unknown token")
        await refused(by_text, "/?token=vm-b", 404, "Unknown token")


async def test_the_token_is_percent_encoded_into_the_url(
    start_bridge: BridgeStarter, echo_target: TcpTarget, api: TokenApiServer
) -> None:
    """A client picks its token: it must not reshape the request to the API."""
    encoded = "a%2F..%2Fadmin%3Fx%3D1%23y%26z"
    api.json(f"/tokens/{encoded}", {"host": "127.0.0.1", "port": echo_target.address.port})
    running = await start_bridge(None, tokens=TokenSettings("json-api", api.url("/tokens/%s")))
    with trio.fail_after(10):
        await relays(running, "/?token=" + urllib.parse.quote("a/../admin?x=1#y&z", safe=""))
        assert api.paths == [f"/tokens/{encoded}"]
        await refused(running, "/?token=..", 404, "Unknown token")
        assert len(api.paths) == 1  # never asked: ".." would climb the API's path


async def test_unix_sockets_and_ipv6_in_answers(api: TokenApiServer) -> None:
    plugin = JsonTokenApi(api.url("/j/%s"))
    text = TokenApi(api.url("/t/%s"))
    api.json("/j/u", {"host": "unix_socket", "port": "/run/vnc/desk.sock"})
    api.answers["/t/u"] = Answer(body=b"unix_socket:/run/vnc/desk.sock")
    api.answers["/t/v"] = Answer(body=b"unix:/run/vnc/other.sock")
    api.answers["/t/w"] = Answer(body=b"[::1]:5901")
    with trio.fail_after(10):
        assert await plugin.lookup("u") == UnixAddress("/run/vnc/desk.sock")
        assert await text.lookup("u") == UnixAddress("/run/vnc/desk.sock")
        assert await text.lookup("v") == UnixAddress("/run/vnc/other.sock")
        assert await text.lookup("w") == TcpAddress("::1", 5901)


# -- an API that cannot answer: 503, one log line -----------------------------------------


def _reason(line: str) -> str:
    return line.partition(": token lookup failed: ")[2]


async def test_api_errors_get_503_and_one_log_line_per_reason(
    start_bridge: BridgeStarter, api: TokenApiServer, bridge_log: LogWaiter
) -> None:
    api.json("/t/vm", {"host": "127.0.0.1", "port": 5900}, status=500)
    api.answers["/t/moved"] = Answer(302, headers={"Location": "http://elsewhere.invalid/"})
    api.answers["/t/busy"] = Answer(429)
    running = await start_bridge(None, tokens=TokenSettings("JSONTokenApi", api.url("/t/%s")))
    dead_url = f"http://127.0.0.1:{free_port()}/t/%s"
    down = await start_bridge(None, tokens=TokenSettings("JSONTokenApi", dead_url))
    with trio.fail_after(10):
        for _ in range(3):
            await refused(running, "/?token=vm", 503, "Token store unavailable")
            await refused(down, "/?token=vm", 503, "Token store unavailable")
        await refused(running, "/?token=moved", 503, "Token store unavailable")
        await refused(running, "/?token=busy", 503, "Token store unavailable")
    url = api.url("/t/%s")
    assert [_reason(line) for line in lookup_failures(bridge_log)] == [
        f"token API {url}: answered 500",
        f"token API {dead_url}: ConnectError: all attempts to connect to "
        f"127.0.0.1:{dead_url.split(':')[2].partition('/')[0]} failed",
        f"token API {url}: answered 302, a redirect, which is not followed "
        "(give the final URL as --token-source)",
        f"token API {url}: answered 429",
    ]
    assert len(api.paths) == 5  # three 500s, the redirect (not followed), the 429


async def test_a_stalled_api_is_a_503_within_the_timeout(
    nursery: trio.Nursery, api: TokenApiServer, bridge_log: LogWaiter
) -> None:
    api.stall = True
    running = await bridge_with(nursery, JsonTokenApi(api.url("/t/%s"), timeout=0.3))
    with trio.fail_after(5):
        start = trio.current_time()
        await refused(running, "/?token=vm", 503, "Token store unavailable")
        await refused(running, "/?token=vm", 503, "Token store unavailable")
        assert trio.current_time() - start < 3
    assert [_reason(line) for line in lookup_failures(bridge_log)] == [
        f"token API {api.url('/t/%s')}: no answer within 0.3 s"
    ]


# -- answers that name no target: 502 ------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "answer", "problem"),
    [
        ("JSONTokenApi", Answer(body=b"not json " + SECRET.encode()), "no JSON object"),
        ("JSONTokenApi", Answer(body=b'{"host": "127.0.0.1"}'), "no JSON object"),
        ("JSONTokenApi", Answer(body=b'["127.0.0.1", 5900]'), "no JSON object"),
        ("JSONTokenApi", Answer(body=b'{"host": "127.0.0.1", "port": true}'), "no JSON object"),
        ("BaseTokenAPI", Answer(body=b"127.0.0.1"), "no host:port"),
        ("BaseTokenAPI", Answer(body=b"a:1\nb:2"), "no host:port"),
        ("BaseTokenAPI", Answer(body=b"\xff\xfe:1"), "no host:port"),
        ("BaseTokenAPI", Answer(body=b"x" * (MAX_ANSWER + 1)), f"more than {MAX_ANSWER} bytes"),
        ("BaseTokenAPI", Answer(body=b"a:1", headers={"Content-Encoding": "gzip"}), "no host"),
        ("JSONTokenApi", Answer(body=b'{"host": "a b", "port": 5900}'), "not a valid host"),
        ("JSONTokenApi", Answer(body=b'{"host": "127.0.0.1", "port": 70000}'), "not within"),
    ],
)
async def test_answers_naming_no_target_get_502(
    start_bridge: BridgeStarter,
    api: TokenApiServer,
    bridge_log: LogWaiter,
    plugin: str,
    answer: Answer,
    problem: str,
) -> None:
    api.answers[f"/t/{SECRET}"] = answer
    running = await start_bridge(None, tokens=TokenSettings(plugin, api.url("/t/%s")))
    with trio.fail_after(10):
        await refused(running, f"/?token={SECRET}", 502, "The token names an unusable target")
        line = await bridge_log.wait_for("names an unusable target")
    assert problem in line.getMessage(), line.getMessage()
    assert describe_token(SECRET) in line.getMessage()
    assert not [r for r in bridge_log.caplog.records if SECRET in r.getMessage()]


# -- the token stays out of every log line -------------------------------------------------


async def test_no_log_line_of_any_library_holds_the_token(
    start_bridge: BridgeStarter,
    echo_target: TcpTarget,
    api: TokenApiServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """httpx logs each request's URL at INFO, httpcore response headers at DEBUG: with the
    root logger at DEBUG (``-v``), no line may hold the token nor its encoded form."""
    caplog.set_level(logging.DEBUG)
    token = SECRET + "/+="
    encoded = urllib.parse.quote(token, safe="")
    api.json(f"/t/{encoded}", {"host": "127.0.0.1", "port": echo_target.address.port})
    api.answers["/t/moved"] = Answer(302, headers={"Location": f"http://x.invalid/{encoded}"})
    running = await start_bridge(None, tokens=TokenSettings("JSONTokenApi", api.url("/t/%s")))
    with trio.fail_after(10):
        await relays(running, "/?token=" + encoded)
        await refused(running, "/?token=moved", 503, "Token store unavailable")
    assert api.paths == [f"/t/{encoded}", "/t/moved"]
    # The test's own websockets client logs its URL: it is the one record left out.
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any(r.levelno == logging.DEBUG and r.name.startswith("trio_bridge") for r in records)
    leaks = [r for r in records if SECRET in r.getMessage() or encoded in r.getMessage()]
    assert not leaks, leaks


async def test_credentials_in_the_url_are_not_logged(
    start_bridge: BridgeStarter, api: TokenApiServer, bridge_log: LogWaiter
) -> None:
    api.answers["/t/vm?key=api-secret"] = Answer(500)
    url = f"http://user:pass-secret@127.0.0.1:{api.port}/t/%s?key=api-secret"
    running = await start_bridge(None, tokens=TokenSettings("BaseTokenAPI", url))
    with trio.fail_after(10):
        await refused(running, "/?token=vm", 503, "Token store unavailable")
    (line,) = lookup_failures(bridge_log)
    assert f"token API http://127.0.0.1:{api.port}/t/%s?key=...: answered 500" in line
    assert not [r for r in bridge_log.caplog.records if "secret" in r.getMessage()]
    assert api.paths == ["/t/vm?key=api-secret"]


# -- the HTTP client's lifetime --------------------------------------------------------------


def test_one_client_per_trio_run_reused_and_closed_when_the_run_ends(
    api: TokenApiServer,
) -> None:
    """The plugin is made before trio.run; each run gets its client at its first lookup,
    keeps its connection for the following ones, and closes it when the run ends."""
    api.json("/t/vm", {"host": "127.0.0.1", "port": 5900})
    plugin = JsonTokenApi(api.url("/t/%s"))
    clients = []

    async def three_lookups() -> None:
        with trio.fail_after(10):
            for _ in range(3):
                assert await plugin.lookup("vm") == TcpAddress("127.0.0.1", 5900)
        clients.append(plugin._client)

    trio.run(three_lookups)
    assert api.connection_closed.wait(10)  # closed by the bridge, when its run ended
    assert api.connections == 1
    trio.run(three_lookups)
    assert api.connections == 2
    first, second = clients
    assert first is not second
    assert first is not None and first.is_closed
    assert second is not None and second.is_closed


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "needs --token-source URL with %s"),
        ("http://api.internal/tokens", "exactly one %s where the token goes, found 0"),
        ("http://api.internal/%s/%s", "exactly one %s where the token goes, found 2"),
        ("ftp://api.internal/%s", "must be an http:// or https:// URL"),
        ("/tokens/%s", "must be an http:// or https:// URL"),
        ("http://%s.api.internal/", "--token-source"),
    ],
)
def test_unusable_urls_are_start_up_errors(source: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        load_token_plugin("JSONTokenApi", source)
