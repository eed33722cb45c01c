"""Token routing end to end: each plugin, each refusal, --allow-target, a real Redis."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path
from typing import ClassVar

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.frames import Opcode
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.config import Address, ConfigError, TcpAddress, TokenSettings, UnixAddress
from trio_bridge.tokens import TargetAllowlist, load_token_plugin
from trio_bridge.tokens.base import describe_token
from trio_bridge.tokens.resp import RedisConnection

from .conftest import (
    BridgeStarter,
    LogWaiter,
    RawClient,
    RunningBridge,
    StartTarget,
    TcpTarget,
    check_echo,
    client_frame,
    echo,
    free_port,
    ws_request,
)
from .security_support import exchange, redis_server, unix_echo


async def relays(running: RunningBridge, path: str) -> None:
    async with connect(
        f"ws://127.0.0.1:{running.port}{path}", subprotocols=[Subprotocol("binary")]
    ) as ws:
        await check_echo(ws, f"via {path}".encode())


async def refused(
    running: RunningBridge, path: str, status: int, text: str, **headers: str | None
) -> None:
    response = await exchange(running.port, ws_request(path, **headers))
    assert response.status_code == status, response
    assert text.encode() in (response.body or b""), response.body


def tokens(plugin: str, source: Path | str, **options: str) -> TokenSettings:
    return TokenSettings(plugin, str(source), **options)


# -- token files -------------------------------------------------------------------------


async def test_token_file_routes_each_token_and_notices_edits(
    start_bridge: BridgeStarter, start_target: StartTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    a, b = await start_target(echo), await start_target(echo)
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\nvm-a: {a.address}\nvm-b:  {b.address}\nno colon here\n")
    running = await start_bridge(None, tokens=tokens("TokenFile", path))
    with trio.fail_after(10):
        await bridge_log.wait_for(f"{path}:5", "line skipped")
        await relays(running, "/websockify?token=vm-a")
        assert (a.accepted, b.accepted) == (1, 0)
        await relays(running, "/?token=vm-b")
        assert (a.accepted, b.accepted) == (1, 1)
        await refused(running, "/?token=vm-c", 404, "Unknown token")
        await refused(running, "/", 404, "No token")
        await refused(running, "/?token=", 404, "No token")
        await refused(running, "/?token=a%20b", 404, "Malformed token")
        await refused(running, "/?token=%0d%0aHost:x", 404, "Malformed token")
        await refused(running, "/?token=vm-a&token=vm-b", 404, "Malformed token")
        # Query values never reach the log: a token grants access to a target.
        await bridge_log.wait_for("GET /?token=... -> 404: Unknown token")
        assert not [r for r in bridge_log.caplog.records if "vm-c" in r.getMessage()]
        path.write_text(path.read_text() + f"vm-c: {b.address}\n")  # no reload needed
        await relays(running, "/?token=vm-c")
        assert (a.accepted, b.accepted) == (1, 2)


async def test_read_only_token_file_changes_on_reload_only(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"old: {echo_target.address}\n")
    running = await start_bridge(None, tokens=tokens("ReadOnlyTokenFile", path))
    with trio.fail_after(10):
        path.write_text(f"new: {echo_target.address}\n")
        await relays(running, "/?token=old")
        await refused(running, "/?token=new", 404, "Unknown token")
        for hook in running.bridge.reload_hooks():
            await hook()
        await relays(running, "/?token=new")
        await refused(running, "/?token=old", 404, "Unknown token")


async def test_token_directory_and_token_file_names(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    folder = tmp_path / "tokens.d"
    folder.mkdir()
    (folder / "one.conf").write_text(f"first: {echo_target.address}\n")
    (folder / "two.conf").write_text(f"second: {echo_target.address}\n")
    (folder / ".hidden").write_text(f"hidden: {echo_target.address}\n")
    names = tmp_path / "by-name"
    names.mkdir()
    (names / "vm7").write_text(f"{echo_target.address}\n")
    (names / "garbage").write_text("not a target\n")
    by_lines = await start_bridge(None, tokens=tokens("TokenFile", folder))
    by_name = await start_bridge(None, tokens=tokens("TokenFileName", names))
    with trio.fail_after(10):
        await relays(by_lines, "/?token=first")
        await relays(by_lines, "/?token=second")
        await refused(by_lines, "/?token=hidden", 404, "Unknown token")
        await relays(by_name, "/?token=vm7")
        await refused(by_name, "/?token=garbage", 404, "Unknown token")
        await refused(by_name, "/?token=..", 404, "Unknown token")
        await refused(by_name, "/?token=..%2Fby-name%2Fvm7", 404, "Unknown token")
    assert echo_target.accepted == 3


async def test_token_from_path_and_from_host(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"vm1: {echo_target.address}\nvm1.bridge.example: {echo_target.address}\n")
    from_path = await start_bridge(None, tokens=tokens("TokenFile", path, token_from="path"))
    from_host = await start_bridge(None, tokens=tokens("TokenFile", path, token_from="host"))
    with trio.fail_after(10):
        await relays(from_path, "/vnc/vm1")
        await relays(from_path, "/vm1/?token=ignored")
        await refused(from_path, "/", 404, "No token")
        await refused(from_path, "/vnc/vm2", 404, "Unknown token")
        client = await RawClient.open(from_host.port)
        await client.send(ws_request("/", Host="VM1.bridge.example:6080"))
        assert (await client.read_response()).status_code == 101
        await client.send(client_frame(Opcode.BINARY, b"by host"))
        assert (await client.read_frame()).data == b"by host"
        await client.aclose()
        await refused(from_host, "/", 404, "Unknown token", Host="vm2.bridge.example")
        await refused(from_host, "/", 404, "No token", Host=None)
    assert echo_target.accepted == 3


async def test_allow_target_refuses_what_a_token_names_elsewhere(
    start_bridge: BridgeStarter, start_target: StartTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    good, forbidden = await start_target(echo), await start_target(echo)
    path = tmp_path / "tokens"
    path.write_text(f"good: {good.address}\nevil: {forbidden.address}\n")
    running = await start_bridge(
        None, tokens=tokens("TokenFile", path), allow_targets=(f"127.0.0.0/8:{good.address.port}",)
    )
    with trio.fail_after(10):
        await relays(running, "/?token=good")
        await refused(running, "/?token=evil", 403, "Target not allowed")
        record = await bridge_log.wait_for("no --allow-target pattern allows")
        assert str(forbidden.address) in record.getMessage()
    assert forbidden.accepted == 0


def test_allow_target_patterns() -> None:
    allow = TargetAllowlist(
        ["10.0.0.0/24:5900-5999", "*.vnc.example:5900", "[2001:db8::/64]:*", "unix:/run/vnc/*"]
    )
    allowed: list[Address] = [
        TcpAddress("10.0.0.7", 5901),
        TcpAddress("Desk.VNC.example", 5900),
        TcpAddress("2001:db8::5", 22),
        UnixAddress("/run/vnc/desk"),
    ]
    refused_targets: list[Address] = [
        TcpAddress("10.0.1.7", 5901),
        TcpAddress("10.0.0.7", 22),
        TcpAddress("vnc.example", 5900),
        TcpAddress("evil.example", 5900),
        TcpAddress("10.0.0.7.evil.example", 5900),
        UnixAddress("/run/other/desk"),
    ]
    assert all(allow.allows(target) for target in allowed)
    assert not any(allow.allows(target) for target in refused_targets)
    for bad in ("10.0.0.1", "host:port", "::1:22", "unix:relative", "h:70000", "h:9-1"):
        with pytest.raises(ConfigError, match="--allow-target"):
            TargetAllowlist([bad])


# -- JWT ----------------------------------------------------------------------------------


async def test_jwt_tokens(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    secret = secrets.token_bytes(32)
    key_file = tmp_path / "jwt.key"
    key_file.write_text(base64.urlsafe_b64encode(secret).decode().rstrip("="))  # websockify's form
    running = await start_bridge(None, tokens=tokens("JWTTokenApi", f"hmac:{key_file}"))
    host, port = echo_target.address.host, echo_target.address.port
    now = int(time.time())

    def sign(claims: dict[str, object], key: bytes = secret, alg: str = "HS256") -> str:
        return jwt.encode(claims, key, algorithm=alg)

    with trio.fail_after(10):
        await relays(running, f"/?token={sign({'host': host, 'port': port, 'exp': now + 60})}")
        await relays(running, f"/?token={sign({'host': host, 'port': str(port)})}")
        cases = [
            (sign({"host": host, "port": port, "exp": now - 10}), "Token expired"),
            (sign({"host": host, "port": port, "nbf": now + 3600}), "Token not valid yet"),
            (sign({"host": host, "port": port}, key=secrets.token_bytes(32)), "Invalid token"),
            (sign({"host": host, "port": port, "aud": "someone-else"}), "Invalid token"),
            (sign({"host": host}), "Invalid token"),
            (sign({"host": host, "port": 70000}), "Invalid token"),
            (
                # PyJWT takes None as the key of alg "none"; its annotation leaves None out
                jwt.encode({"host": host, "port": port}, None, algorithm="none"),  # type: ignore[arg-type]
                "Invalid token",
            ),
            ("not.a.jwt", "Invalid token"),
        ]
        for token, reason in cases:
            await refused(running, f"/?token={token}", 403, reason)
    assert echo_target.accepted == 2


async def test_jwt_with_a_public_key(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    running = await start_bridge(None, tokens=tokens("jwt", key_file))
    claims = {"host": echo_target.address.host, "port": echo_target.address.port}
    with trio.fail_after(10):
        await relays(running, f"/?token={jwt.encode(claims, private, algorithm='ES256')}")
        # Algorithm confusion: an HMAC token keyed with the public key must not pass.
        forged = _hs256(claims, public_pem)
        await refused(running, f"/?token={forged}", 403, "Invalid token")
    assert echo_target.accepted == 1


async def test_jwt_audience_and_issuer_are_required_when_configured(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = TokenSettings(
        "JWTTokenApi", str(key_file), jwt_audience="vnc-bridge", jwt_issuer="https://idp.test"
    )
    running = await start_bridge(None, tokens=settings)
    target = {"host": echo_target.address.host, "port": echo_target.address.port}
    right = {"aud": "vnc-bridge", "iss": "https://idp.test"}

    def sign(**claims: object) -> str:
        return jwt.encode({**target, **claims}, private, algorithm="ES256")

    with trio.fail_after(10):
        await relays(running, f"/?token={sign(**right)}")
        await relays(running, f"/?token={sign(**right | {'aud': ['other', 'vnc-bridge']})}")
        cases = [
            (sign(iss=right["iss"]), "no 'aud' claim, which --jwt-audience requires"),
            (sign(**right | {"aud": "other"}), "its 'aud' claim does not name the audience"),
            (sign(aud=right["aud"]), "no 'iss' claim, which --jwt-issuer requires"),
            (sign(**right | {"iss": "https://evil.test"}), "its 'iss' claim is not the issuer"),
        ]
        for token, reason in cases:
            await refused(running, f"/?token={token}", 403, "Invalid token")
            line = await bridge_log.wait_for("JWT", reason, logger="trio_bridge.tokens")
            assert describe_token(token) in line.getMessage()
            assert not [r for r in bridge_log.caplog.records if token in r.getMessage()]
    assert echo_target.accepted == 2


def test_jwt_claims_options_are_for_jwt_only(tmp_path: Path) -> None:
    from trio_bridge.cli import build_parser, config_from_args

    path = tmp_path / "tokens"
    path.write_text("a: 127.0.0.1:5900\n")
    with pytest.raises(ConfigError, match="only with --token-plugin JWTTokenApi"):
        load_token_plugin("TokenFile", str(path), jwt_audience="vnc")
    with pytest.raises(ConfigError, match="--jwt-issuer: empty"):
        TokenSettings("jwt", "key.pem", jwt_issuer=" ")
    parser = build_parser()
    with pytest.raises(ConfigError, match="--jwt-audience needs --token-plugin"):
        config_from_args(parser.parse_args(["--jwt-audience", "vnc", "6080", "h:1"]))
    argv = ["--token-plugin", "jwt", "--token-source", "k.pem", "--jwt-audience", "vnc",
            "--jwt-issuer", "https://idp.test", "6080"]  # fmt: skip
    tokens = config_from_args(parser.parse_args(argv)).bridge.tokens
    assert tokens is not None
    assert (tokens.jwt_audience, tokens.jwt_issuer) == ("vnc", "https://idp.test")


def _hs256(claims: dict[str, object], key: bytes) -> str:
    """An HS256 token by hand: PyJWT itself refuses to use a PEM key as an HMAC secret."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_jwt_refuses_weak_secrets(tmp_path: Path) -> None:
    key_file = tmp_path / "short.key"
    key_file.write_text(base64.urlsafe_b64encode(b"too short").decode())
    with pytest.raises(ConfigError, match="at least 32"):
        load_token_plugin("JWTTokenApi", f"hmac:{key_file}")


# -- Unix sockets named by token ---------------------------------------------------------


async def test_unix_socket_directory(start_bridge: BridgeStarter, tmp_path: Path) -> None:
    folder = tmp_path / "sockets"
    folder.mkdir()
    (folder / "plain-file").write_text("not a socket")
    with trio.fail_after(10):
        async with unix_echo(folder / "console1") as accepted:
            running = await start_bridge(
                None,
                tokens=tokens("UnixDomainSocketDirectory", folder),
                allow_targets=(f"unix:{folder}/*",),
            )
            await relays(running, "/?token=console1")
            await refused(running, "/?token=plain-file", 404, "Unknown token")
            await refused(running, "/?token=console2", 404, "Unknown token")
            await refused(running, "/?token=..%2Fsockets%2Fconsole1", 404, "Unknown token")
            assert accepted == [1]


# -- Redis --------------------------------------------------------------------------------


async def _redis_set(
    address: Address, *pairs: tuple[str, str], password: str | None = None
) -> None:
    connection = await RedisConnection.open(address)
    try:
        if password:
            await connection.call("AUTH", password)
        for key, value in pairs:
            assert await connection.call("SET", key, value) == b"OK"
    finally:
        await connection.aclose()


async def test_redis_tokens_shared_by_two_bridges(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path, bridge_log: LogWaiter
) -> None:
    port = free_port()
    target = str(echo_target.address)
    with trio.fail_after(20):
        async with redis_server(tmp_path / "redis", port) as redis:
            await _redis_set(
                TcpAddress("127.0.0.1", port),
                ("plain", target),
                ("json", json.dumps({"host": target})),
                ("app:ns-token", target),
                ("junk", "{not json"),
            )
            over_tcp = await start_bridge(None, tokens=tokens("TokenRedis", f"127.0.0.1:{port}"))
            over_unix = await start_bridge(None, tokens=tokens("redis", str(redis.socket)))
            namespaced = await start_bridge(
                None, tokens=tokens("TokenRedis", f'127.0.0.1:{port}:0::"app"')
            )
            for running in (over_tcp, over_unix):
                await relays(running, "/?token=plain")
                await relays(running, "/?token=json")
                await refused(running, "/?token=missing", 404, "Unknown token")
                await refused(running, "/?token=junk", 404, "Unknown token")
            await relays(namespaced, "/?token=ns-token")
            await refused(namespaced, "/?token=plain", 404, "Unknown token")
            await redis.stop()
            await refused(over_tcp, "/?token=plain", 503, "Token store unavailable")
            await bridge_log.wait_for("token lookup failed", "Redis at")
    assert echo_target.accepted == 5


async def test_redis_with_a_password(
    start_bridge: BridgeStarter, echo_target: TcpTarget, tmp_path: Path
) -> None:
    port = free_port()
    with trio.fail_after(20):
        async with redis_server(tmp_path / "redis", port, password="s3cret:pass") as redis:
            await _redis_set(
                UnixAddress(str(redis.socket)),
                ("tok", str(echo_target.address)),
                password="s3cret:pass",
            )
            good = await start_bridge(
                None, tokens=tokens("TokenRedis", f'127.0.0.1:{port}::"s3cret:pass"')
            )
            wrong = await start_bridge(None, tokens=tokens("TokenRedis", f"127.0.0.1:{port}::nope"))
            await relays(good, "/?token=tok")
            await relays(good, "/?token=tok")  # on a reused connection
            await refused(wrong, "/?token=tok", 503, "Token store unavailable")
    assert echo_target.accepted == 2


def test_redis_source_syntax() -> None:
    from trio_bridge.tokens.redis_store import RedisTokens, split_source

    assert split_source('h:1:2:"p:w":"a:b"') == ["h", "1", "2", "p:w", "a:b"]
    assert split_source("h:::pw") == ["h", "", "", "pw"]
    store = RedisTokens("redis.local::3::ns")
    assert (store.address, store.db, store.password, store.namespace) == (
        TcpAddress("redis.local", 6379),
        3,
        None,
        "ns:",
    )
    with pytest.raises(ConfigError, match="numbers"):
        RedisTokens("h:port")


# -- operators' own plugins and the command line -------------------------------------------


class AsyncPlugin:
    """The documented interface: async lookup returning an Address."""

    target: Address | None = None

    def __init__(self, source: str | None) -> None:
        self.prefix = source or ""

    async def lookup(self, token: str) -> Address | None:
        await trio.lowlevel.checkpoint()
        return self.target if token.startswith(self.prefix) else None


class WebsockifyStylePlugin:
    """websockify's interface: blocking lookup returning [host, port]."""

    target: ClassVar[list[str]] = []

    def __init__(self, source: str | None) -> None:
        self.source = source

    def lookup(self, token: str) -> list[str] | None:
        return self.target if token == self.source else None


async def test_operator_plugins(start_bridge: BridgeStarter, echo_target: TcpTarget) -> None:
    AsyncPlugin.target = echo_target.address
    WebsockifyStylePlugin.target = [echo_target.address.host, str(echo_target.address.port)]
    mine = await start_bridge(None, tokens=TokenSettings("tests.test_tokens:AsyncPlugin", "ok-"))
    theirs = await start_bridge(
        None, tokens=TokenSettings("tests.test_tokens.WebsockifyStylePlugin", "magic")
    )
    with trio.fail_after(10):
        await relays(mine, "/?token=ok-1")
        await refused(mine, "/?token=nope", 404, "Unknown token")
        await relays(theirs, "/?token=magic")
        await refused(theirs, "/?token=other", 404, "Unknown token")


def test_command_lines_websockify_users_have() -> None:
    from trio_bridge.addons import Addons
    from trio_bridge.cli import build_parser, config_from_args

    parser = build_parser()

    def config(*argv: str) -> object:
        """What the CLI does before serving: the config, then its parts, built once."""
        return Addons(config_from_args(parser.parse_args(list(argv))))

    with pytest.raises(ConfigError, match="no such file"):
        config("--token-plugin", "TokenFile", "--token-source", "/nonexistent/tokens", "6080")
    with pytest.raises(ConfigError, match="unknown plugin 'NoSuchPlugin'; built in: TokenFile"):
        config("--token-plugin", "NoSuchPlugin", "6080")
    with pytest.raises(ConfigError, match="--token-source needs --token-plugin"):
        config("--token-source", "x", "6080", "h:1")
    with pytest.raises(ConfigError, match="expected one address"):
        config("--token-plugin", "TokenFile", "--token-source", "/etc/hostname", "6080", "h:1")
    with pytest.raises(ConfigError, match="not allowed by any --allow-target"):
        config("--allow-target", "10.0.0.0/8:*", "6080", "192.168.1.1:5900")


def test_websockify_token_command_line(tmp_path: Path) -> None:
    from trio_bridge.cli import build_parser, config_from_args

    path = tmp_path / "tokens"
    path.write_text("a: 127.0.0.1:5900\n")
    parser = build_parser()
    for argv in (
        ["--token-plugin", "TokenFile", "--token-source", str(path), "--host-token", "6080"],
        ["--token-plugin", "websockify.token_plugins.TokenFile", "--token-source", str(path),
         "--host-token", "6080"],
        ["--target-config", str(path), "--token-from", "host", "6080"],
    ):  # fmt: skip
        config = config_from_args(parser.parse_args(argv)).bridge
        assert config.target is None
        assert config.tokens is not None and config.tokens.token_from == "host"
