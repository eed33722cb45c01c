"""Authentication gates end to end: HTTP Basic, Origin allowlist, client-certificate names."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import trio
from websockets.trio.client import connect

from trio_bridge.auth import BasicAuth, OriginAllowlist
from trio_bridge.config import Address, AuthSettings, ConfigError, TokenSettings

from .conftest import BridgeStarter, LogWaiter, RunningBridge, TcpTarget, check_echo, ws_request
from .security_support import Pki, chmod_private, exchange, pki

__all__ = ["pki"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def status_of(running: RunningBridge, **headers: str | None) -> tuple[int, dict[str, str]]:
    response = await exchange(running.port, ws_request("/", **headers))
    return response.status_code, dict(response.headers.raw_items())


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("# user:password\nalice:correct horse\nbob:pässword:with:colons\n")
    return chmod_private(path)


async def test_basic_auth(
    start_bridge: BridgeStarter, echo_target: TcpTarget, credentials: Path, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(
        echo_target.address, auth=(AuthSettings("BasicHTTPAuth", str(credentials)),)
    )
    with trio.fail_after(10):
        for authorization in (
            None,
            basic("alice", "wrong"),
            basic("mallory", "correct horse"),
            "Bearer abc",
            "Basic !!!not-base64",
        ):
            status, headers = await status_of(running, Authorization=authorization)
            assert status == 401
            assert headers["WWW-Authenticate"] == 'Basic realm="trio-bridge", charset="UTF-8"'
        await bridge_log.wait_for("-> 401: Authentication required")
        await bridge_log.wait_for("wrong user name or password", "'mallory'")
        for user, password in (("alice", "correct horse"), ("bob", "pässword:with:colons")):
            headers = {"Authorization": basic(user, password)}
            async with connect(running.url, additional_headers=headers) as ws:
                await check_echo(ws, user.encode())
        # The credentials file is re-read on reload (SIGHUP).
        await trio.Path(credentials).write_text("carol:new\n")
        for hook in running.bridge.reload_hooks():
            await hook()
        carol = {"Authorization": basic("carol", "new")}
        async with connect(running.url, additional_headers=carol) as ws:
            await check_echo(ws, b"carol")
        assert (await status_of(running, Authorization=basic("alice", "correct horse")))[0] == 401
    assert echo_target.accepted == 3


def test_basic_auth_sources(tmp_path: Path) -> None:
    inline = BasicAuth("user:pass")  # websockify's --auth-source user:password
    assert inline.verify("user", b"pass") and not inline.verify("user", b"pas")
    assert not inline.verify("nobody", b"pass")
    with pytest.raises(ConfigError, match="no such credentials file"):
        BasicAuth(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("no separator\n")
    with pytest.raises(ConfigError, match="bad:1: expected user:password"):
        BasicAuth(str(bad))


async def test_origin_allowlist(
    start_bridge: BridgeStarter, echo_target: TcpTarget, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(
        echo_target.address, allow_origins=("https://vnc.example.com", "https://*.lab.example")
    )
    with trio.fail_after(10):
        for origin in (
            "https://vnc.example.com",
            "https://desk1.lab.example",
            "HTTPS://VNC.example.com:443",
        ):
            async with connect(running.url, origin=origin) as ws:  # type: ignore[arg-type]
                await check_echo(ws, origin.encode())
        for refused in (
            None,
            "https://evil.example",
            "http://vnc.example.com",
            "https://vnc.example.com:8443",
            "https://lab.example",
            "https://evil-lab.example",
            "https://vnc.example.com.evil.example",
            "null",
        ):
            status, _ = await status_of(running, Origin=refused)
            assert status == 403, refused
        await bridge_log.wait_for("Origin 'https://evil.example' is not allowed")
    assert echo_target.accepted == 3


def test_origin_entries_are_checked() -> None:
    with pytest.raises(ConfigError, match="scheme://host"):
        OriginAllowlist("vnc.example.com")
    assert OriginAllowlist("http://localhost:6080").allows("http://localhost:6080")


async def test_client_certificate_names(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(
        echo_target.address,
        tls=pki.settings(cafile=str(pki.ca_file)),  # certificates optional, verified if sent
        auth=(AuthSettings("ClientCertCNAuth", "alice ops@example.com"),),
    )
    url = f"wss://127.0.0.1:{running.port}/"
    with trio.fail_after(10):
        alice = pki.ca.issue_cert("alice.example", common_name="alice")
        by_email = pki.ca.issue_cert("ops@example.com", common_name="operator")
        for cert in (alice, by_email):
            async with connect(url, ssl=pki.client_context(cert=cert)) as ws:
                await check_echo(ws, b"certified")
        mallory = pki.ca.issue_cert("mallory.example", common_name="mallory")
        for unaccepted in (mallory, None):
            with pytest.raises(Exception, match="403"):  # websockets' InvalidStatus
                async with connect(url, ssl=pki.client_context(cert=unaccepted)):
                    pass
        await bridge_log.wait_for("client certificate", "mallory", "is not accepted")
        status, _ = await status_of(running)  # plain ws://: no certificate at all
        assert status == 403
    assert echo_target.accepted == 2


def test_client_certificate_names_need_a_ca(pki: Pki) -> None:
    """Found when the gates are built: only loading the plugin tells it is the
    certificate-names one, whichever of its names (websockify's, ours) was given."""
    from trio_bridge import Bridge, Config, TcpAddress

    for name in ("ClientCertCNAuth", "websockify.auth_plugins.ClientCertCNAuth"):
        config = Config(
            target=TcpAddress("h", 1), tls=pki.settings(), auth=(AuthSettings(name, "alice"),)
        )
        with pytest.raises(ConfigError, match="ClientCertCNAuth needs --cert and --cafile"):
            Bridge(config)


class CountingPlugin:
    lookups = 0

    def __init__(self, source: str | None) -> None:
        pass

    async def lookup(self, token: str) -> Address | None:
        CountingPlugin.lookups += 1
        return None


async def test_gates_run_before_any_token_lookup(
    start_bridge: BridgeStarter, credentials: Path
) -> None:
    running = await start_bridge(
        None,
        tokens=TokenSettings("tests.test_auth:CountingPlugin"),
        auth=(AuthSettings("basic", str(credentials)),),
    )
    with trio.fail_after(10):
        response = await exchange(running.port, ws_request("/?token=t"))
        assert response.status_code == 401
        assert CountingPlugin.lookups == 0
        authorized = ws_request("/?token=t", Authorization=basic("alice", "correct horse"))
        assert (await exchange(running.port, authorized)).status_code == 404
        assert CountingPlugin.lookups == 1


async def test_websockify_style_auth_plugin(
    start_bridge: BridgeStarter, echo_target: TcpTarget
) -> None:
    running = await start_bridge(
        echo_target.address, auth=(AuthSettings("tests.test_auth.HeaderAuth", "open-sesame"),)
    )
    with trio.fail_after(10):
        assert (await status_of(running, X_Key="wrong"))[0] == 418
        async with connect(running.url, additional_headers={"X-Key": "open-sesame"}) as ws:
            await check_echo(ws, b"in")


class HeaderAuthError(Exception):
    code = 418
    msg = "Not a teapot key"
    headers: dict[str, str] = {}  # noqa: RUF012


class HeaderAuth:
    """websockify's auth plugin interface: blocking authenticate(headers, host, port)."""

    def __init__(self, src: str | None = None) -> None:
        self.src = src

    def authenticate(self, headers: object, target_host: object, target_port: object) -> None:
        if getattr(headers, "get")("X-Key") != self.src:  # noqa: B009
            raise HeaderAuthError()
