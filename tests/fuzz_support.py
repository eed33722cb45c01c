"""Support for tests/test_fuzz.py: every front door of the CLI, run in one Trio thread.

- :class:`Harness` runs the bridges ("doors") in a Trio event loop on a background
  thread, so hypothesis drives plain blocking sockets from the test thread. A door
  whose bridge crashed is restarted before the next example (so hypothesis can shrink
  a crash to its minimal input) and its crash is reported by the example that caused
  it. Each door holds one WebSocket session open, opened before the examples; after
  every example it must still echo a fresh message.
- Wire helpers that parse what the bridge sends strictly (HTTP responses, server
  frames) and build what a hostile client sends (frames with any bits, lengths,
  masks).
- Token plugins that answer with the wrong types, loaded by their dotted path as an
  operator's plugin would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import socket
import ssl
import struct
import threading
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.uri import parse_uri

from trio_bridge import Bridge, Config, Limits, TcpAddress
from trio_bridge.addons import Addons
from trio_bridge.config import AuthSettings, ServiceConfig, TlsSettings, TokenSettings, UnixAddress
from trio_bridge.recording import running_recorder
from trio_bridge.tokens import TokenStoreError
from trio_bridge.tokens.resp import RedisConnection

from .conftest import TcpTarget, echo, free_port, loopback_listener
from .security_support import Pki, RedisServer, chmod_private

USER, PASSWORD = "fuzz", "secret"
GOOD_ORIGIN = "https://good.example"
MAX_MESSAGE = 64 * 1024
# Where an operator's data points that cannot be reached, with close reasons > 123 bytes.
LONG_UNIX = "/nonexistent-fuzz/" + "u" * 100 + ".sock"
IDNA_HOST = "ä" * 70 + ".example"


# -- token plugins that misbehave ----------------------------------------------------------


class PluginRaised(Exception):
    """What the misbehaving plugins raise on purpose (token ``raise``)."""


def _answer(token: str, good: TcpAddress) -> Any:
    """The wrong (and a few right) answers a plugin bug could give, by token."""
    answers: dict[str, Callable[[], Any]] = {
        "good": lambda: good,
        "none": lambda: None,
        "str": lambda: str(good),
        "tuple": lambda: (good.host, good.port),
        "list": lambda: [good.host, good.port],
        "bytes": lambda: str(good).encode(),
        "int": lambda: good.port,
        "dict": lambda: {"host": good.host, "port": good.port},
        "object": lambda: object(),
        "true": lambda: True,
        "strport": lambda: TcpAddress(good.host, str(good.port)),  # type: ignore[arg-type]
        "hugeport": lambda: TcpAddress(good.host, 70000),
        "negport": lambda: TcpAddress(good.host, -1),
        "zeroport": lambda: TcpAddress(good.host, 0),
        "nulhost": lambda: TcpAddress("127.0.0.1\x00evil", good.port),
        "emptyhost": lambda: TcpAddress("", good.port),
        "idna": lambda: TcpAddress(IDNA_HOST, 5900),
        "surrogate": lambda: TcpAddress("\udcff.example", 5900),
        "emptyunix": lambda: UnixAddress(""),
        "nulunix": lambda: UnixAddress("/tmp/\x00x"),
        "longunix": lambda: UnixAddress(LONG_UNIX),
        "hostnone": lambda: TcpAddress(None, good.port),  # type: ignore[arg-type]
    }
    if token == "raise":
        raise PluginRaised("the test plugin raised on purpose")
    if token == "storeerror":
        raise TokenStoreError("the test plugin's store is down on purpose")
    make = answers.get(token)
    return make() if make is not None else None


PLUGIN_TOKENS = [
    "good", "none", "str", "tuple", "list", "bytes", "int", "dict", "object", "true",
    "strport", "hugeport", "negport", "zeroport", "nulhost", "emptyhost", "idna",
    "surrogate", "emptyunix", "nulunix", "longunix", "hostnone", "raise", "storeerror",
]  # fmt: skip


def _good(source: str | None) -> TcpAddress:
    host, _, port = (source or "").rpartition(":")
    return TcpAddress(host, int(port))


class MisbehavingTokens:
    """An async token plugin (``--token-plugin tests.fuzz_support.MisbehavingTokens``)."""

    def __init__(self, source: str | None) -> None:
        self.good = _good(source)

    async def lookup(self, token: str) -> Any:
        return _answer(token, self.good)


class MisbehavingBlockingTokens:
    """A websockify-style plugin: blocking ``lookup`` returning ``[host, port]`` and co."""

    def __init__(self, source: str | None) -> None:
        self.good = _good(source)

    def lookup(self, token: str) -> Any:
        shapes: dict[str, Callable[[], Any]] = {
            "good": lambda: [self.good.host, self.good.port],
            "strport": lambda: [self.good.host, str(self.good.port)],
            "bytesport": lambda: [self.good.host, str(self.good.port).encode()],
            "badport": lambda: [self.good.host, "http"],
            "floatport": lambda: [self.good.host, 5900.5],
            "noneport": lambda: [self.good.host, None],
            "hugeport": lambda: [self.good.host, 1 << 70],
            "three": lambda: [self.good.host, self.good.port, 1],
            "unixint": lambda: ["unix_socket", 5],
            "unixlong": lambda: ["unix_socket", LONG_UNIX],
            "hostint": lambda: [127, self.good.port],
            "hostbytes": lambda: [b"127.0.0.1", self.good.port],
            "idna": lambda: [IDNA_HOST, 5900],
            "address": lambda: self.good,
        }
        make = shapes.get(token)
        return make() if make is not None else _answer(token, self.good)


BLOCKING_PLUGIN_TOKENS = [
    *PLUGIN_TOKENS, "bytesport", "badport", "floatport", "noneport", "three", "unixint",
    "unixlong", "hostint", "hostbytes", "address",
]  # fmt: skip


# Values only the Redis store holds (tests/fuzz_support.py Harness._fill_redis).
REDIS_ONLY_TOKENS = ["json", "jsonint", "jsonlist", "jsonidna", "junk", "binary", "nul", "empty"]


# -- strict parsers of what the bridge sends -----------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) ([\t\x20-\x7e\x80-\xff]*)\r\n")


@dataclass
class HttpAnswer:
    status: int
    reason: str
    headers: Headers
    body: bytes
    rest: bytes  # what followed the response (frames after a 101)


class Malformed(AssertionError):
    """The bridge sent bytes that are not a well-formed response or frame stream."""


def parse_http(data: bytes, *, head: bool = False) -> HttpAnswer | None:
    """The response at the start of ``data``, strictly: None when ``data`` stops before
    its end (read more); :class:`Malformed` when it is not HTTP/1.1."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > 65536:
            raise Malformed(f"no end of the response head: {data[:200]!r}")
        return None
    match = STATUS_LINE.match(data)
    if match is None:
        raise Malformed(f"bad status line: {data[:200]!r}")
    # websockets parses headers as part of a response: behind a 204, which has no body, so
    # the body rules (HEAD, Content-Length) stay this function's.
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    protocol.receive_data(b"HTTP/1.1 204 No Content\r\n" + data[match.end() : end + 4])
    parsed = protocol.events_received()
    if not parsed or not isinstance(parsed[0], Response):
        cause = protocol.handshake_exc and protocol.handshake_exc.__cause__
        raise Malformed(f"bad response headers ({cause}): {data[: end + 4]!r}")
    headers = parsed[0].headers
    status = int(match.group(1))
    after = data[end + 4 :]
    lengths = headers.get_all("Content-Length")
    if len(lengths) > 1:
        raise Malformed(f"{len(lengths)} Content-Length headers")
    if status == 101 or status == 304 or head or 100 <= status < 200 or status == 204:
        return HttpAnswer(status, match.group(2).decode("latin-1"), headers, b"", after)
    if not lengths or not lengths[0].isdigit():
        raise Malformed(f"a {status} without a usable Content-Length: {data[: end + 4]!r}")
    length = int(lengths[0])
    if len(after) < length:
        return None
    body, rest = after[:length], after[length:]
    return HttpAnswer(status, match.group(2).decode("latin-1"), headers, body, rest)


@dataclass
class ServerFrame:
    fin: bool
    rsv1: bool
    opcode: int
    payload: bytes


# Close codes a server may send (RFC 6455 7.4, IANA registry), and the application ranges.
SENDABLE_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 1013, 1014}


def parse_server_frames(data: bytes, *, deflate: bool) -> tuple[list[ServerFrame], bool]:
    """Frames the bridge sent, checked against RFC 6455; also whether the stream ended
    with a close frame. A partial frame at the end (connection cut mid-frame) is
    :class:`Malformed`; so is anything after a close frame."""
    frames: list[ServerFrame] = []
    pos = 0
    closed = False
    while pos < len(data):
        if closed:
            raise Malformed(f"bytes after the close frame: {data[pos : pos + 40]!r}")
        if len(data) - pos < 2:
            raise Malformed(f"truncated frame header: {data[pos:]!r}")
        b0, b1 = data[pos], data[pos + 1]
        fin, rsv1, rsv23, opcode = bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x30, b0 & 0x0F
        masked, length = bool(b1 & 0x80), b1 & 0x7F
        pos += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        if masked:
            raise Malformed("the server masked a frame")
        if rsv23 or (rsv1 and (not deflate or opcode >= 8)):
            raise Malformed(f"reserved bits set: {b0:#x}")
        if opcode not in (0, 1, 2, 8, 9, 10):
            raise Malformed(f"unknown opcode {opcode}")
        if opcode >= 8 and (length > 125 or not fin):
            raise Malformed(f"control frame of {length} bytes, fin={fin}")
        if len(data) - pos < length:
            raise Malformed(f"truncated frame: {length} bytes announced, {len(data) - pos} sent")
        payload = data[pos : pos + length]
        pos += length
        if opcode == 8:
            closed = True
            if len(payload) == 1:
                raise Malformed("close frame with a 1-byte payload")
            if payload:
                (code,) = struct.unpack("!H", payload[:2])
                if code not in SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
                    raise Malformed(f"close code {code}")
                try:
                    payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    raise Malformed(f"close reason not UTF-8: {payload!r}") from None
        frames.append(ServerFrame(fin, rsv1, opcode, payload))
    return frames, closed


# -- what a hostile client sends ---------------------------------------------------------


@dataclass(frozen=True)
class RawFrame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # bits 0x4 (rsv1), 0x2, 0x1
    masked: bool = True
    declared: int | None = None  # a length header that lies (the payload is still sent)

    def serialize(self) -> bytes:
        head = bytes([(0x80 if self.fin else 0) | (self.rsv << 4) | (self.opcode & 0x0F)])
        length = len(self.payload) if self.declared is None else self.declared
        mask_bit = 0x80 if self.masked else 0
        if length < 126:
            head += bytes([mask_bit | length])
        elif length < 1 << 16:
            head += bytes([mask_bit | 126]) + struct.pack("!H", length)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", min(length, (1 << 64) - 1))
        if not self.masked:
            return head + self.payload
        key = b"\x37\xfa\x21\x3d"
        repeated = (key * (len(self.payload) // 4 + 1))[: len(self.payload)]
        masked = (int.from_bytes(self.payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            len(self.payload), "big"
        )
        return head + key + masked


def deflate(payload: bytes) -> bytes:
    """permessage-deflate's encoding of one message (RFC 7692 7.2.1)."""
    compressor = zlib.compressobj(wbits=-15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data.removesuffix(b"\x00\x00\xff\xff")


# -- the doors ----------------------------------------------------------------------------


@dataclass
class Door:
    """One configured front door: a bridge (with what the CLI adds) on a loopback port."""

    name: str
    service: ServiceConfig
    ws_path: str = "/"  # a request path the door relays to the allowed target
    ws_headers: dict[str, str] = field(default_factory=dict)
    http_port: str = "ws"  # "metrics": examples go to the metrics port
    plugin_errors: bool = False  # a test plugin may fail on purpose: one ERROR, a 500
    tokens: list[str] = field(default_factory=list)
    # set while running
    port: int = 0
    metrics_port: int = 0
    bridge: Bridge | None = None
    failure: BaseException | None = None
    held: ClientConnection | None = None
    scope: trio.CancelScope | None = None
    starts: int = 0

    @property
    def tls(self) -> bool:
        return self.service.bridge.tls is not None

    @property
    def deflate(self) -> bool:
        return self.service.bridge.compression

    def failure_text(self) -> str:
        assert self.failure is not None
        return "".join(traceback.format_exception(self.failure))


class LogRecords(logging.Handler):
    """Records at WARNING and above (and anything with a traceback) since the last clear."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            with self.guard:
                self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        with self.guard:
            records, self.records = self.records, []
        return records


def describe(record: logging.LogRecord) -> str:
    text = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    return text


class Harness:
    """The doors, their targets and services, in a Trio loop on a background thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.doors: dict[str, Door] = {}
        self.log = LogRecords()
        self.allowed: TcpTarget | None = None
        self.forbidden: TcpTarget | None = None
        self.pki: Pki | None = None
        self.jwt_secret = secrets.token_bytes(32)
        self.redis: RedisServer | None = None
        self.failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._thread: threading.Thread | None = None
        self._counter = 0
        self._client_context: ssl.SSLContext | None = None
        self.closed_port = free_port()  # nothing listens there

    # -- life cycle (test thread) --------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def thread() -> None:
            try:
                trio.run(self._main, ready)
            except BaseException as exc:  # reported by the tests, not lost in the thread
                self.failure = exc
                ready.set()

        logging.getLogger("trio_bridge").addHandler(self.log)
        self._thread = threading.Thread(target=thread, name="fuzz-bridges", daemon=True)
        self._thread.start()
        assert ready.wait(60), "the bridges did not start"
        if self.failure is not None:
            raise AssertionError(
                "the bridges did not start:\n" + "".join(traceback.format_exception(self.failure))
            )
        for door in self.doors.values():
            self.open_held(door)

    def stop(self) -> None:
        for door in self.doors.values():
            self.close_held(door)
        if self._token is not None and self.failure is None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(30)
        logging.getLogger("trio_bridge").removeHandler(self.log)

    # -- the Trio side ---------------------------------------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.allowed = await nursery.start(TcpTarget(echo).serve)
            self.forbidden = await nursery.start(TcpTarget(echo).serve)
            _mkdir(self.folder / "recordings")
            redis = RedisServer(self.folder / "redis", free_port(), None)
            (self.folder / "redis").mkdir()
            await redis.start(nursery)
            self.redis = redis
            try:
                await self._fill_redis(TcpAddress("127.0.0.1", redis.port))
                for door in self._configure():
                    self.doors[door.name] = door
                    await self.start_door(door)
                ready.set()
                await self._stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await redis.stop()
            nursery.cancel_scope.cancel()  # the bridges (and their recorders), the targets

    def token_targets(self) -> dict[str, str]:
        """Token -> target as an operator's data writes it (file, folder, Redis)."""
        assert self.allowed is not None and self.forbidden is not None
        return {
            "good": str(self.allowed.address),
            "evil": str(self.forbidden.address),
            "closed": f"127.0.0.1:{self.closed_port}",
            "longunix": f"unix:{LONG_UNIX}",
            "idna": f"{IDNA_HOST}:5900",
            # A name the resolver answers from /etc/hosts: no test sends a DNS query.
            "name": f"localhost:{self.closed_port}",
        }

    async def _fill_redis(self, address: TcpAddress) -> None:
        connection = await RedisConnection.open(address)
        try:
            values: dict[str, str | bytes] = dict(self.token_targets())
            assert self.allowed is not None
            values.update(
                {
                    "json": json.dumps({"host": str(self.allowed.address)}),
                    "jsonint": json.dumps({"host": 5}),
                    "jsonlist": "[1, 2]",
                    "jsonidna": json.dumps({"host": f"{IDNA_HOST}:5900"}),
                    "junk": "{not json",
                    "binary": b"\xff\xfe\x00:5900",
                    "nul": "127.0.0.1\x00evil:5900",
                    "empty": "",
                }
            )
            for key, value in values.items():
                await connection.call("SET", key, value)
        finally:
            await connection.aclose()

    def _configure(self) -> list[Door]:
        assert self.allowed is not None
        folder = self.folder
        limits = Limits(
            handshake_timeout=5, close_timeout=1, connect_timeout=2, max_message_size=MAX_MESSAGE
        )
        good = self.allowed.address
        allow = (
            f"127.0.0.1:{good.port}",
            f"127.0.0.1:{self.closed_port}",
            "localhost:*",
            "unix:/nonexistent-fuzz/*",
        )
        targets = self.token_targets()
        token_file = folder / "tokens"
        token_file.write_text("".join(f"{t}: {a}\n" for t, a in targets.items()), "utf-8")
        by_name = folder / "by-name"
        by_name.mkdir()
        for token, address in targets.items():
            (by_name / token).write_text(address + "\n", "utf-8")
        (by_name / ".hidden").write_text(f"{good}\n")
        (by_name / "garbage").write_bytes(b"\xff\xfe not a target\n")
        credentials = folder / "users"
        credentials.write_text(f"{USER}:{PASSWORD}\nüser:pässword\n", "utf-8")
        chmod_private(credentials)
        web = make_web_root(folder / "web")
        self.pki = Pki(_mkdir(folder / "pki"))
        jwt_key = folder / "jwt.key"
        import base64

        jwt_key.write_text(base64.urlsafe_b64encode(self.jwt_secret).decode().rstrip("="))
        auth = (AuthSettings("BasicHTTPAuth", str(credentials)),)
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        token_names = [*targets, "missing"]
        assert self.redis is not None
        redis_port = self.redis.port
        support = f"{__name__}"

        def tokens(plugin: str, source: str, where: str = "query") -> TokenSettings:
            return TokenSettings(plugin, source, where)

        def routed(name: str, settings: TokenSettings, **options: Any) -> ServiceConfig:
            options.setdefault("allow_targets", allow)
            return ServiceConfig(Config(target=None, limits=limits, tokens=settings, **options))

        return [
            Door(
                "web",
                ServiceConfig(
                    Config(target=good, limits=limits, auth=auth, allow_origins=(GOOD_ORIGIN,)),
                    web=web,
                    web_listing=True,
                    web_auth=True,
                ),
                ws_headers={"Authorization": basic, "Origin": GOOD_ORIGIN},
            ),
            Door("health", ServiceConfig(Config(target=good, limits=limits))),
            Door(
                "metrics",
                ServiceConfig(
                    Config(target=good, limits=limits),
                    metrics_listen=TcpAddress("127.0.0.1", 0),
                ),
                http_port="metrics",
            ),
            Door(
                "query",
                routed("query", tokens("TokenFile", str(token_file))),
                ws_path="/?token=good",
                tokens=token_names,
            ),
            Door(
                "path",
                routed("path", tokens("TokenFile", str(token_file), "path")),
                ws_path="/websockify/good",
                tokens=token_names,
            ),
            Door(
                "host",
                routed("host", tokens("TokenFile", str(token_file), "host")),
                ws_headers={"Host": "good"},
                tokens=token_names,
            ),
            Door(
                "folder",
                routed("folder", tokens("TokenFileName", str(by_name))),
                ws_path="/?token=good",
                tokens=[*token_names, ".hidden", "garbage"],
            ),
            Door(
                "redis",
                routed("redis", tokens("TokenRedis", f"127.0.0.1:{redis_port}")),
                ws_path="/?token=good",
                tokens=[*token_names, *REDIS_ONLY_TOKENS],
            ),
            Door(
                "jwt",
                routed("jwt", tokens("JWTTokenApi", f"hmac:{jwt_key}")),
                ws_path="/?token=" + self.sign({"host": good.host, "port": good.port}),
            ),
            Door(
                "plugin",
                ServiceConfig(
                    Config(
                        target=None,
                        limits=limits,
                        tokens=tokens(f"{support}.MisbehavingTokens", str(good)),
                    )
                ),
                ws_path="/?token=good",
                plugin_errors=True,
                tokens=PLUGIN_TOKENS,
            ),
            Door(
                "blocking-plugin",
                routed(
                    "blocking-plugin",
                    tokens(f"{support}:MisbehavingBlockingTokens", str(good)),
                ),
                ws_path="/?token=good",
                plugin_errors=True,
                tokens=BLOCKING_PLUGIN_TOKENS,
            ),
            Door(
                "tls",
                ServiceConfig(
                    Config(
                        target=good,
                        # TLS cannot half-close: the bridge's wait for the client's EOF
                        # after its answer or close frame always runs to the end.
                        limits=dataclasses.replace(limits, close_timeout=0.25),
                        tls=TlsSettings(str(self.pki.server_file)),
                    )
                ),
            ),
            Door(
                "compression", ServiceConfig(Config(target=good, limits=limits, compression=True))
            ),
            Door(
                "recording",
                ServiceConfig(Config(target=good, limits=limits), record=folder / "recordings"),
            ),
        ]

    def sign(self, claims: dict[str, Any]) -> str:
        import jwt

        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    async def start_door(self, door: Door) -> None:
        """(Re)start a door's bridge, as the CLI composes it (trio_bridge.addons)."""
        assert self._nursery is not None
        door.failure = None
        door.starts += 1
        listener = loopback_listener()
        door.port = listener.getsockname()[1]
        metrics: list[socket.socket] = []
        if door.service.metrics_listen is not None:
            metrics = [loopback_listener()]
            door.metrics_port = metrics[0].getsockname()[1]
        addons = Addons(door.service, metrics_listeners=metrics)
        bridge = addons.bridge
        scope = trio.CancelScope()
        door.scope = scope

        async def run(*, task_status: trio.TaskStatus[Bridge] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    async with running_recorder(addons.recorder):  # as trio_bridge.service
                        await addons.serve([listener], task_status=task_status)
            except Exception as exc:  # the door crashed: the example that did it reports it
                door.failure = exc
            finally:
                if door.bridge is bridge:
                    door.bridge = None

        door.bridge = bridge
        await self._nursery.start(run)

    def restart(self, door: Door) -> None:
        self.close_held(door)
        assert self._token is not None
        if door.bridge is not None and door.scope is not None:
            trio.from_thread.run_sync(door.scope.cancel, trio_token=self._token)
        trio.from_thread.run(self.start_door, door, trio_token=self._token)
        self.open_held(door)

    # -- clients (test thread) ----------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        if self._client_context is None:
            assert self.pki is not None
            self._client_context = self.pki.client_context()
        return self._client_context

    def open_held(self, door: Door) -> None:
        """The session opened before the examples, kept open through them."""
        scheme = "wss" if door.tls else "ws"
        headers = dict(door.ws_headers)
        host = headers.pop("Host", "127.0.0.1")  # the client writes Host from the URI
        door.held = ws_connect(
            f"{scheme}://{host}:{door.port}{door.ws_path}",
            sock=socket.create_connection(("127.0.0.1", door.port), timeout=10),
            server_hostname="127.0.0.1" if door.tls else None,
            additional_headers=headers,
            subprotocols=["binary"],  # type: ignore[list-item]
            ssl=self.client_context() if door.tls else None,
            compression="deflate" if door.deflate else None,
            open_timeout=10,
            ping_interval=None,
            close_timeout=2,
            max_size=None,
        ).__enter__()
        self.check_held(door)

    def close_held(self, door: Door) -> None:
        if door.held is not None:
            with contextlib.suppress(Exception):
                door.held.close()
            door.held = None

    def check_held(self, door: Door) -> None:
        """The held session echoes a fresh message byte for byte."""
        assert door.held is not None
        self._counter += 1
        payload = f"held session {door.name} #{self._counter} ".encode() + os.urandom(16)
        door.held.send(payload)
        echoed = b""
        while len(echoed) < len(payload):
            data = door.held.recv(timeout=10)
            assert isinstance(data, bytes), data
            echoed += data
        assert echoed == payload, (echoed, payload)

    def alive(self, door: Door) -> bool:
        return (
            self.failure is None
            and door.failure is None
            and door.bridge is not None
            and door.held is not None
        )

    def settle(self, door: Door, timeout: float = 10.0) -> None:
        """Wait until the door serves only its held session again (the example's
        connection is fully handled, so its log lines are in)."""
        deadline = _now() + timeout
        while _now() < deadline:
            bridge = door.bridge
            if bridge is None or door.failure is not None:
                return
            if bridge.connections <= 1:
                return
            _sleep(0.002)

    def connect(
        self, door: Door, *, port: int | None = None, tls: bool | None = None
    ) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port or door.port), timeout=10)
        if door.tls if tls is None else tls:
            return self.client_context().wrap_socket(sock, server_hostname="127.0.0.1")
        return sock


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _now() -> float:
    import time

    return time.monotonic()


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def make_web_root(root: Path) -> Path:
    """A web root with the shapes the file server answers differently."""
    root.mkdir()
    (root / "app.js").write_text("console.log('fuzz')\n")
    (root / "vnc.html").write_text("<!DOCTYPE html><title>vnc</title>\n")
    sub = _mkdir(root / "sub")
    (sub / "page.html").write_text("<p>page</p>\n")
    (sub / "ä ü%20.txt").write_text("non-ASCII name\n")
    (sub / "a\x01b<&>.txt").write_text("control character in the name\n")
    with_index = _mkdir(root / "withindex")
    (with_index / "index.html").write_text("<p>index</p>\n")
    _mkdir(root / "empty")
    (root / ".hidden").write_text("dotfile secret\n")
    (root.parent / "outside-secret").write_text("outside secret\n")
    (sub / "out").symlink_to(root.parent / "outside-secret")
    return root


WEB_PATHS = [
    "/", "/app.js", "/vnc.html", "/sub", "/sub/", "/sub/page.html", "/sub/%C3%A4%20%C3%BC%2520.txt",
    "/sub/a%01b%3C%26%3E.txt", "/withindex", "/withindex/", "/empty", "/empty/", "/.hidden",
    "/sub/out", "/missing", "/healthz", "/healthz/", "/metrics", "/websockify", "//sub",
    "/sub/../app.js", "/%2e%2e/outside-secret", "/sub%2f", "*", "http://x/sub",
]  # fmt: skip


@contextlib.contextmanager
def harness(folder: Path) -> Iterator[Harness]:
    running = Harness(folder)
    try:
        running.start()
        yield running
    finally:
        running.stop()
