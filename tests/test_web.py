"""The file server and health endpoint on the WebSocket port, through real sockets.

Requests are written byte for byte (so traversal attempts reach the server exactly as
typed) and answers are read to EOF: every answer closes the connection.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.addons import Addons
from trio_bridge.config import AuthSettings, Config, ConfigError, Limits, ServiceConfig, TcpAddress
from trio_bridge.server import Bridge
from trio_bridge.web import FileResponse, FileServer, FirstAnswer, HealthEndpoint, Lookup

from .conftest import WS_KEY, LogWaiter, TcpTarget, free_port, loopback_listener

SECRET = b"the secret outside the web root\n"
HELLO = b"hello, files\n"
HIDDEN = b"a dotfile's content\n"


@dataclass
class Reply:
    status: int
    headers: Headers
    body: bytes


async def fetch(
    port: int,
    target: str | bytes,
    method: str = "GET",
    *,
    fields: Sequence[tuple[str, str]] = (),
    **headers: str,
) -> Reply:
    """One raw HTTP/1.1 request; ``target`` goes on the request line untouched.

    ``fields`` are header lines sent as given, a name repeated if it appears twice.
    """
    raw_target = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines += [f"{name}: {value}" for name, value in fields]
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), raw_target)
    request = head + "".join(line + "\r\n" for line in lines).encode("latin-1") + b"\r\n"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    parsed = Headers()
    for field in header_lines:
        name, _, value = field.partition(":")
        parsed[name.strip()] = value.strip()
    return Reply(int(status_line.split()[1]), parsed, body)


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    """A web root beside a secret; links inside and out, a hidden file, a FIFO, an index."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_bytes(HELLO)
    (root / "app.js").write_text("export const x = 1;\n")
    (root / "page.html").write_text("<!DOCTYPE html><title>p</title>\n")
    (root / "style.css").write_text("body { color: red }\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "blob.unknownext").write_bytes(b"\0\1\2")
    (root / "with space é.txt").write_text("spaced\n")
    (root / ".hidden").write_bytes(HIDDEN)
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_text("<p>docs index</p>\n")
    (root / "plain").mkdir()
    (root / "plain" / "a.txt").write_text("a\n")
    (root / "plain" / "<b>.txt").write_text("b\n")
    (root / "plain" / ".secret-dotfile").write_text("x\n")
    (root / "alias.txt").symlink_to("hello.txt")
    (root / "plain" / "link-out").symlink_to(tmp_path / "secret.txt")
    (root / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (root / "dir-out").symlink_to(tmp_path / "outside")
    os.mkfifo(root / "fifo")
    return root


SERVICE_FIELDS = {field.name for field in dataclasses.fields(ServiceConfig)} - {"bridge"}


def service_config(**fields: Any) -> ServiceConfig:
    """Bridge and service fields in one set of keywords, as a command line mixes them."""
    own = {name: fields.pop(name) for name in list(fields) if name in SERVICE_FIELDS}
    return ServiceConfig(Config(**fields), **own)


@dataclass
class WebBridge:
    port: int
    bridge: Bridge
    url: str


@pytest.fixture
async def start_web(nursery: trio.Nursery, echo_target: TcpTarget) -> Any:
    """``await start_web(root, **config_fields)``: a bridge built as the CLI builds it."""

    async def start(root: Path | None, **fields: Any) -> WebBridge:
        fields.setdefault("target", None if fields.get("file_only") else echo_target.address)
        addons = Addons(service_config(web=root, limits=Limits(close_timeout=0.5), **fields))
        listener = loopback_listener()
        port = listener.getsockname()[1]
        bridge = addons.bridge
        await nursery.start(addons.serve, [listener])
        return WebBridge(port, bridge, f"ws://127.0.0.1:{port}/websockify")

    return start


@pytest.fixture
async def web(start_web: Any, web_root: Path) -> WebBridge:
    bridge: WebBridge = await start_web(web_root)
    return bridge


# -- content and types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/hello.txt", "text/plain; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/page.html", "text/html; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/image.png", "image/png"),
        ("/blob.unknownext", "application/octet-stream"),
        ("/with%20space%20%C3%A9.txt", "text/plain; charset=utf-8"),
    ],
)
async def test_files_are_served_with_their_content_type(
    web: WebBridge, web_root: Path, path: str, content_type: str
) -> None:
    reply = await fetch(web.port, path)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == content_type
    name = path.lstrip("/").replace("%20", " ").replace("%C3%A9", "é")
    assert reply.body == (web_root / name).read_bytes()
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert reply.headers["Connection"] == "close"


async def test_query_string_is_ignored(web: WebBridge) -> None:
    reply = await fetch(web.port, "/hello.txt?autoconnect=true&host=x")
    assert (reply.status, reply.body) == (200, HELLO)


async def test_head_sends_headers_only(web: WebBridge) -> None:
    reply = await fetch(web.port, "/hello.txt", method="HEAD")
    assert reply.status == 200
    assert reply.headers["Content-Length"] == str(len(HELLO))
    assert reply.body == b""


async def test_symlink_inside_the_root_is_served(web: WebBridge) -> None:
    reply = await fetch(web.port, "/alias.txt")
    assert (reply.status, reply.body) == (200, HELLO)


# -- conditional requests --------------------------------------------------------------


async def test_etag_revalidation_gives_304_without_body(web: WebBridge) -> None:
    first = await fetch(web.port, "/hello.txt")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    again = await fetch(web.port, "/hello.txt", If_None_Match=etag)
    assert again.status == 304
    assert again.body == b""
    assert again.headers["ETag"] == etag
    assert "Content-Length" not in again.headers
    weak = await fetch(web.port, "/hello.txt", If_None_Match=f'"other", W/{etag}')
    assert weak.status == 304
    other = await fetch(web.port, "/hello.txt", If_None_Match='"not-this-one"')
    assert (other.status, other.body) == (200, HELLO)


async def test_if_modified_since_gives_304_until_the_file_changes(
    web: WebBridge, web_root: Path
) -> None:
    first = await fetch(web.port, "/hello.txt")
    last_modified = first.headers["Last-Modified"]
    assert (await fetch(web.port, "/hello.txt", If_Modified_Since=last_modified)).status == 304
    older = email.utils.formatdate(0, usegmt=True)
    assert (await fetch(web.port, "/hello.txt", If_Modified_Since=older)).status == 200
    # An ETag that no longer matches wins over a date that still would.
    changed = await fetch(
        web.port, "/hello.txt", If_Modified_Since=last_modified, If_None_Match='"stale"'
    )
    assert changed.status == 200
    stamp = (web_root / "hello.txt").stat().st_mtime + 10
    os.utime(web_root / "hello.txt", (stamp, stamp))
    newer = await fetch(web.port, "/hello.txt", If_None_Match=first.headers["ETag"])
    assert newer.status == 200
    assert newer.headers["ETag"] != first.headers["ETag"]


# -- folders -----------------------------------------------------------------------------


async def test_folder_redirects_to_slash_then_serves_its_index(
    web: WebBridge, web_root: Path
) -> None:
    moved = await fetch(web.port, "/docs?x=1")
    assert moved.status == 301
    assert moved.headers["Location"] == "/docs/?x=1"
    index = await fetch(web.port, "/docs/")
    assert (index.status, index.body) == (200, b"<p>docs index</p>\n")
    # Never an off-site redirect, whatever the request's own spelling of the folder.
    (web_root / "evil.example").mkdir()
    moved = await fetch(web.port, "//evil.example")
    assert (moved.status, moved.headers["Location"]) == (301, "/evil.example/")


async def test_listings_are_off_by_default(web: WebBridge) -> None:
    for path in ("/", "/plain/"):
        reply = await fetch(web.port, path)
        assert reply.status == 403
        assert b"listing is off" in reply.body
        assert b"a.txt" not in reply.body


async def test_listing_with_web_listing(start_web: Any, web_root: Path) -> None:
    bridge = await start_web(web_root, web_listing=True)
    reply = await fetch(bridge.port, "/plain/")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert '<a href="a.txt">a.txt</a>' in page
    assert '<a href="%3Cb%3E.txt">&lt;b&gt;.txt</a>' in page  # escaped, never markup
    assert ".secret-dotfile" not in page
    assert "link-out" not in page  # a link out of the root is not served, so not listed
    root = (await fetch(bridge.port, "/")).body.decode()
    assert 'href="docs/"' in root
    assert "dir-out" not in root
    assert "fifo" in root  # listed, but never served (below)


# -- what is refused -----------------------------------------------------------------

TRAVERSALS = [
    "/../secret.txt",
    "/docs/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/.%2e/secret.txt",
    "/docs/%2e%2e/%2e%2e/secret.txt",
    "/..%2fsecret.txt",
    "/..%2Fsecret.txt",
    "/%2e%2e%2fsecret.txt",
    "/docs%2f..%2f..%2fsecret.txt",
    "/..\\secret.txt",
    "/%5c..%5csecret.txt",
    "/%252e%252e/secret.txt",
    "/./hello.txt",
    "/hello.txt%00.png",
    "/%00",
    "/%ff%fe",
    "/link-out.txt",
    "/plain/link-out",
    "/dir-out/secret.txt",
    "/dir-out/",
    "//outside/secret.txt",
    "/.hidden",
    "/fifo",
    "http://127.0.0.1/../secret.txt",
    "*",
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_traversal_attempts_are_refused(web: WebBridge, target: str) -> None:
    reply = await fetch(web.port, target)
    assert reply.status in (400, 403, 404), reply
    assert SECRET not in reply.body
    assert HIDDEN not in reply.body


async def test_raw_nul_byte_in_the_request_line_is_refused(web: WebBridge) -> None:
    reply = await fetch(web.port, b"/hello.txt\x00/../../secret.txt")
    assert reply.status == 400
    assert SECRET not in reply.body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_methods_other_than_get_and_head_are_refused(web: WebBridge, method: str) -> None:
    reply = await fetch(web.port, "/hello.txt", method=method)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


async def test_files_over_the_size_limit_are_refused(
    nursery: trio.Nursery, echo_target: TcpTarget, web_root: Path
) -> None:
    files = FileServer(web_root, max_file_size=4)
    listener = loopback_listener()
    config = Config(target=echo_target.address, limits=Limits(close_timeout=0.5))
    await nursery.start(Bridge(config, http=files).serve, [listener])
    reply = await fetch(listener.getsockname()[1], "/hello.txt")
    assert reply.status == 403
    assert b"4-byte limit" in reply.body


def test_web_root_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--web"):
        Addons(ServiceConfig(Config(target=None), web=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--web"):
        FileServer(tmp_path / "missing")


# -- the relay on the same port ----------------------------------------------------------


async def test_websocket_upgrades_still_reach_the_target(web: WebBridge) -> None:
    with trio.fail_after(10):
        async with connect(web.url, subprotocols=[Subprotocol("binary")]) as ws:
            await ws.send(b"through the relay")
            assert await ws.recv() == b"through the relay"
    assert (await fetch(web.port, "/websockify")).status == 404  # plain GET: a file request


async def test_file_only_serves_files_and_refuses_every_upgrade(
    start_web: Any, web_root: Path, echo_target: TcpTarget
) -> None:
    bridge = await start_web(web_root, file_only=True)
    assert (await fetch(bridge.port, "/hello.txt")).body == HELLO
    with trio.fail_after(10), pytest.raises(InvalidStatus) as refused:
        async with connect(bridge.url, subprotocols=[Subprotocol("binary")]):
            pass
    assert refused.value.response.status_code == 403
    assert b"--file-only" in refused.value.response.body
    assert echo_target.accepted == 0


def test_file_only_takes_no_target(web_root: Path) -> None:
    with pytest.raises(ConfigError, match="--file-only"):
        service_config(target=TcpAddress("127.0.0.1", 5900), web=web_root, file_only=True)
    with pytest.raises(ConfigError, match="need --web"):
        service_config(target=None, file_only=True)


# -- health ------------------------------------------------------------------------------


async def test_health_endpoint_answers_ok(web: WebBridge) -> None:
    reply = await fetch(web.port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["Cache-Control"] == "no-store"
    assert (await fetch(web.port, "/healthz", method="HEAD")).body == b""


async def test_health_endpoint_without_web_and_its_failures(
    nursery: trio.Nursery, echo_target: TcpTarget
) -> None:
    problems: list[str] = []
    health = HealthEndpoint("/health", [lambda: problems[0] if problems else None])
    listener = loopback_listener()
    port = listener.getsockname()[1]
    config = Config(target=echo_target.address, limits=Limits(close_timeout=0.5))
    await nursery.start(Bridge(config, http=FirstAnswer(health)).serve, [listener])
    assert (await fetch(port, "/health")).status == 200
    problems.append("the wrapped program is not running")
    failing = await fetch(port, "/health")
    assert (failing.status, failing.body) == (503, b"the wrapped program is not running\n")
    # Anything else is still a WebSocket endpoint: a plain GET gets 426, as without health.
    assert (await fetch(port, "/")).status == 426


async def test_health_path_can_be_turned_off(start_web: Any, web_root: Path) -> None:
    bridge = await start_web(web_root, health_path=None)
    assert (await fetch(bridge.port, "/healthz")).status == 404  # now just a missing file


# -- --web-auth ----------------------------------------------------------------------------


async def test_web_auth_applies_the_auth_plugin_to_files_but_not_health(
    start_web: Any, web_root: Path
) -> None:
    auth = (AuthSettings("basic", "alice:wonderland"),)
    bridge = await start_web(web_root, web_auth=True, auth=auth, allow_origins=("http://x",))
    refused = await fetch(bridge.port, "/hello.txt")
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic ")
    assert HELLO not in refused.body
    wrong = base64.b64encode(b"alice:rabbit").decode()
    assert (await fetch(bridge.port, "/hello.txt", Authorization=f"Basic {wrong}")).status == 401
    right = base64.b64encode(b"alice:wonderland").decode()
    allowed = await fetch(bridge.port, "/hello.txt", Authorization=f"Basic {right}")
    assert (allowed.status, allowed.body) == (200, HELLO)  # no Origin header needed for files
    assert (await fetch(bridge.port, "/healthz")).status == 200


async def test_without_web_auth_files_are_public_even_with_auth(
    start_web: Any, web_root: Path
) -> None:
    bridge = await start_web(web_root, auth=(AuthSettings("basic", "alice:wonderland"),))
    assert (await fetch(bridge.port, "/hello.txt")).status == 200


async def test_the_opened_file_itself_must_be_inside_the_root(web_root: Path) -> None:
    """The last line of defence, for a folder swapped for a link after realpath(): what
    was actually opened is checked, whatever path led there."""
    files = FileServer(web_root)
    lookup = Lookup("GET", "/swapped", "", None, None)
    outside = files._file(str(web_root.parent / "secret.txt"), lookup)
    assert outside.status_code == 404
    assert SECRET not in outside.body
    inside = files._file(str(web_root / "hello.txt"), lookup)
    assert isinstance(inside, FileResponse)
    with inside.file as body:
        assert (inside.status_code, os.pread(body.fd, 100, 0)) == (200, HELLO)


# -- requests that once ended the process ------------------------------------------------
# Each is answered with its own status and a log line naming the cause, and the bridge
# serves the next request.


@pytest.mark.parametrize("header", ["If-None-Match", "If-Modified-Since"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/hello.txt", "/missing", "/docs"])
async def test_a_repeated_conditional_header_is_a_400_naming_it(
    web: WebBridge, bridge_log: LogWaiter, header: str, method: str, path: str
) -> None:
    value = email.utils.formatdate(0, usegmt=True) if header == "If-Modified-Since" else '"x"'
    with trio.fail_after(10):
        reply = await fetch(web.port, path, method, fields=[(header, value), (header, value)])
        assert reply.status == 400
        if method == "GET":
            assert reply.body == f"the {header} header is given 2 times; send it once\n".encode()
        else:
            assert reply.body == b""
        await bridge_log.wait_for(f"{method} {path} -> 400: the {header} header is given 2 times")
        assert (await fetch(web.port, "/hello.txt")).body == HELLO


async def test_a_folder_redirect_percent_encodes_control_characters_in_the_query(
    web: WebBridge, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(10):
        moved = await fetch(web.port, b"/docs?\x01a=\x1b[31m&b=%20\x7f")
        assert moved.status == 301
        assert moved.headers["Location"] == "/docs/?%01a=%1B%5B31m&b=%20%7F"
        record = await bridge_log.wait_for("-> 301")
        assert "GET /docs?\\x01a=" in record.getMessage()  # values are redacted in logs
        assert printable_only(record.getMessage())
        followed = await fetch(web.port, moved.headers["Location"])
        assert followed.body == b"<p>docs index</p>\n"


def printable_only(text: str | bytes) -> bool:
    """No C0 control character (but the line ends of an HTTP body) and no DEL."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return not any((ord(c) < 0x20 and c != "\n") or ord(c) == 0x7F for c in text)


async def test_answers_and_logs_quote_the_request_with_control_characters_escaped(
    start_web: Any, web_root: Path, bridge_log: LogWaiter
) -> None:
    (web_root / "plain" / "bell\a.txt").write_text("ding\n")
    bridge = await start_web(web_root, web_listing=True)
    with trio.fail_after(10):
        missing = await fetch(bridge.port, b"/missing\x1b[2J\x01\x7f.txt")
        assert missing.status == 404
        assert missing.body == b"/missing\\x1b[2J\\x01\\x7f.txt not found\n"
        record = await bridge_log.wait_for("-> 404")
        assert "/missing\\x1b[2J\\x01\\x7f.txt" in record.getMessage()
        assert printable_only(record.getMessage())
        method = await fetch(bridge.port, "/hello.txt", method="P\x1bOST")
        assert method.status == 405
        assert b"method P\\x1bOST is not allowed" in method.body
        record = await bridge_log.wait_for("-> 405")
        assert printable_only(record.getMessage())
        listing = await fetch(bridge.port, b"/plain/")
        assert b'<a href="bell%07.txt">bell\\x07.txt</a>' in listing.body
        assert printable_only(listing.body)


@dataclass
class CliBridge:
    """A ``trio-bridge`` process (the real command line), its port and its log so far."""

    process: trio.Process
    port: int
    output: bytearray
    _more: trio.Event

    async def read_output(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self.output.extend(chunk)
            self._more.set()
            self._more = trio.Event()
        self._more.set()

    async def wait_for(self, text: bytes) -> None:
        while text not in self.output:
            assert self.process.returncode is None or self._more.is_set(), self.output.decode()
            more = self._more
            await more.wait()
            if more is self._more:  # the output ended
                raise AssertionError(f"trio-bridge exited:\n{self.output.decode()}")

    def rss(self) -> int:
        """The process's resident memory in bytes (VmRSS)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("VmRSS:")]
        return int(line.split()[1]) * 1024


StartCli = Callable[..., Awaitable[CliBridge]]


@pytest.fixture
async def start_cli(nursery: trio.Nursery) -> AsyncIterator[StartCli]:
    """``await start_cli(*options, prefix=[...])``: ``trio-bridge *options PORT`` running,
    its output read all along (a full pipe would stall it); ended after the test."""
    processes: list[trio.Process] = []

    async def start(*options: str, prefix: Sequence[str] = ()) -> CliBridge:
        port = free_port()
        argv = [*prefix, sys.executable, "-m", "trio_bridge.cli", "--log", "stderr", *options]
        process = await trio.lowlevel.open_process([*argv, str(port)], stderr=subprocess.PIPE)
        processes.append(process)
        bridge = CliBridge(process, port, bytearray(), trio.Event())
        nursery.start_soon(bridge.read_output)
        with trio.fail_after(20):
            await bridge.wait_for(b"listening on")
        return bridge

    yield start
    for process in processes:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        process.kill()


def without_file_permission_override() -> list[str]:
    """A command prefix under which permission bits bind this process: root bypasses them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so root's child drops those capabilities."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


async def test_an_unreadable_folder_is_a_403_naming_the_cause(
    start_cli: StartCli, web_root: Path
) -> None:
    locked = web_root / "locked"
    locked.mkdir()
    (locked / "inside.txt").write_text("x\n")
    locked.chmod(0)
    try:
        bridge = await start_cli(
            "--web",
            str(web_root),
            "--web-listing",
            "--file-only",
            prefix=without_file_permission_override(),
        )
        with trio.fail_after(20):
            listing = await fetch(bridge.port, "/locked/")
            cause = b"/locked/: permission denied: the server cannot list this folder"
            assert (listing.status, listing.body) == (403, cause + b"\n")
            await bridge.wait_for(b"GET /locked/ -> 403: " + cause)
            inside = await fetch(bridge.port, "/locked/inside.txt")
            assert inside.status == 403
            assert b"permission denied" in inside.body
            assert (await fetch(bridge.port, "/hello.txt")).body == HELLO
            assert bridge.process.returncode is None
    finally:
        locked.chmod(0o755)


async def test_a_head_refused_by_the_websocket_handshake_gets_no_body(
    web: WebBridge, bridge_log: LogWaiter
) -> None:
    """Any answer to HEAD is headers only, whoever built it (here websockets' 405)."""
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    with trio.fail_after(10):
        reply = await fetch(
            web.port, "/", "HEAD", fields=[*upgrade.items(), ("Sec-WebSocket-Key", WS_KEY)]
        )
        assert (reply.status, reply.body) == (405, b"")
        assert int(reply.headers["Content-Length"]) > 0  # the length a GET's body would have
        await bridge_log.wait_for("HEAD / -> 405: unsupported HTTP method: HEAD")
