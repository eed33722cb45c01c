"""TLS on the listening port (sniffed from the first byte) and to the target, with
certificates made in the test: good, expired, from the wrong CA, missing."""

from __future__ import annotations

import secrets
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.trio.client import connect
from websockets.typing import Subprotocol

from trio_bridge.config import ConfigError, TargetTlsSettings, TlsSettings
from trio_bridge.tls import server_context

from .conftest import (
    BridgeStarter,
    Handler,
    LogWaiter,
    RawClient,
    TcpTarget,
    check_echo,
    echo,
    free_port,
    ws_request,
)
from .security_support import Pki, exchange, open_from, pki, read_all, tls_echo_target
from .test_systemd import clean_env, spawn

__all__ = ["pki"]


def wss(port: int, path: str = "/") -> str:
    return f"wss://127.0.0.1:{port}{path}"


async def tls_refused(url: str, context: ssl.SSLContext) -> BaseException | None:
    """The TLS error behind a failed opening (websockets' Trio client wraps it)."""
    with pytest.raises(trio.BrokenResourceError) as failure:
        async with connect(url, ssl=context):
            pass
    return failure.value.__cause__


async def test_wss_and_ws_share_one_port(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings())
    with trio.fail_after(10):
        async with connect(
            wss(running.port), ssl=pki.client_context(), subprotocols=[Subprotocol("binary")]
        ) as secure:
            await check_echo(secure, b"over TLS")
            (session,) = running.bridge.sessions
            assert session.channel.transport.raw is None  # no splice(2) under TLS
            async with connect(running.url, subprotocols=[Subprotocol("binary")]) as plain:
                await check_echo(plain, b"in the clear")
            await check_echo(secure, b"x" * 200_000)


async def test_ssl_only_answers_plain_clients_400(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings(ssl_only=True))
    with trio.fail_after(10):
        client = await RawClient.open(running.port)
        await client.send(ws_request())
        response = await client.read_response()
        assert response.status_code == 400
        assert b"only TLS" in (response.body or b"")
        assert await client.read_to_eof() == b""
        await bridge_log.wait_for(client.local_address, "400", "--ssl-only")
        await client.aclose()
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:
            await check_echo(ws, b"wss still works")
    assert echo_target.accepted == 1


async def test_expired_server_certificate_is_refused_by_the_client(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    pki.write_server(pki.expired("127.0.0.1"))
    running = await start_bridge(echo_target.address, tls=pki.settings())
    with trio.fail_after(10):
        cause = await tls_refused(wss(running.port), pki.client_context())
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert "expired" in str(cause)
        await bridge_log.wait_for("TLS handshake failed")
    assert echo_target.accepted == 0


async def test_certificate_from_another_ca_is_refused_by_the_client(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings())
    with trio.fail_after(10):
        cause = await tls_refused(wss(running.port), pki.client_context(trust=trustme.CA()))
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert "unable to get local issuer" in str(cause)
        record = await bridge_log.wait_for("TLS handshake failed")
        assert "client 127.0.0.1:" in record.getMessage()
    assert echo_target.accepted == 0


async def _client_fails(url: str, context: ssl.SSLContext) -> None:
    """Connecting fails at the TLS or WebSocket handshake (TLS 1.3 reports a refused client
    certificate after the client's side of the handshake completed)."""
    # Which error depends on when the server gives up: ssl.SSLError, a reset, EOF...
    with pytest.raises(Exception):  # noqa: B017
        async with connect(url, ssl=context, subprotocols=[Subprotocol("binary")]) as ws:
            await ws.send(b"must not arrive")
            await ws.recv()


async def test_client_certificate_required(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    settings = pki.settings(verify_client=True, cafile=str(pki.ca_file))
    running = await start_bridge(echo_target.address, tls=settings)
    with trio.fail_after(10):
        await _client_fails(wss(running.port), pki.client_context())
        await bridge_log.wait_for("TLS handshake failed", "certificate")
        expired = pki.expired("alice")
        await _client_fails(wss(running.port), pki.client_context(cert=expired))
        await bridge_log.wait_for("TLS handshake failed", "expired")
        stranger = trustme.CA().issue_cert("mallory")
        await _client_fails(wss(running.port), pki.client_context(cert=stranger))
        good = pki.ca.issue_cert("alice")
        async with connect(wss(running.port), ssl=pki.client_context(cert=good)) as ws:
            await check_echo(ws, b"with a certificate")
    assert echo_target.accepted == 1


async def test_minimum_version_refuses_older_clients(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings(minimum_version="1.3"))
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(10):
        assert isinstance(await tls_refused(wss(running.port), old), ssl.SSLError)
        await bridge_log.wait_for("TLS handshake failed", "unsupported protocol")
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:
            await check_echo(ws, b"TLS 1.3")


async def test_tls_handshake_is_bounded_by_the_handshake_timeout(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, bridge_log: LogWaiter
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings(), handshake_timeout=1)
    with trio.fail_after(10):
        stream = await open_from(running.port)
        await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello, then silence
        started = trio.current_time()
        await read_all(stream)
        assert trio.current_time() - started < 3
        await stream.aclose()
        await bridge_log.wait_for("handshake")


async def test_certificate_reload_keeps_open_sessions(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, tmp_path: Path
) -> None:
    running = await start_bridge(echo_target.address, tls=pki.settings())
    renewed = trustme.CA()
    with trio.fail_after(10):
        async with connect(wss(running.port), ssl=pki.client_context()) as before:
            await check_echo(before, b"old certificate")
            pki.write_server(renewed.issue_cert("127.0.0.1"))
            for hook in running.bridge.reload_hooks():
                await hook()
            await check_echo(before, b"still open after the reload")
            async with connect(wss(running.port), ssl=pki.client_context(trust=renewed)) as ws:
                await check_echo(ws, b"new certificate")
            cause = await tls_refused(wss(running.port), pki.client_context())
            assert isinstance(cause, ssl.SSLCertVerificationError)
        # A broken file on reload keeps the previous certificate.
        pki.server_file.write_text("not a certificate")
        hooks = running.bridge.reload_hooks()
        with pytest.raises(ConfigError, match="--cert"):
            for hook in hooks:
                await hook()
        async with connect(wss(running.port), ssl=pki.client_context(trust=renewed)) as ws:
            await check_echo(ws, b"kept")


async def test_ssl_target_verified_against_its_ca(
    start_bridge: BridgeStarter, pki: Pki, bridge_log: LogWaiter
) -> None:
    with trio.fail_after(10):
        async with tls_echo_target(pki) as target:
            good = TargetTlsSettings(cafile=str(pki.ca_file))
            running = await start_bridge(target.address, target_tls=good)
            async with connect(running.url, subprotocols=[Subprotocol("binary")]) as ws:
                await check_echo(ws, b"TLS to the target")

            other = tmp_path_ca(pki)
            refused = await start_bridge(
                target.address, target_tls=TargetTlsSettings(cafile=str(other))
            )
            async with connect(refused.url) as ws:
                await ws.wait_closed()
                assert ws.close_code == 1011
                assert ws.close_reason is not None
                assert "certificate verify failed" in ws.close_reason
            await bridge_log.wait_for("TLS handshake failed")

            insecure = await start_bridge(
                target.address, target_tls=TargetTlsSettings(verify=False)
            )
            async with connect(insecure.url) as ws:
                await check_echo(ws, b"unverified, as asked")


def tmp_path_ca(pki: Pki) -> Path:
    path = pki.folder / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_configuration_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.pem: cannot read it"):
        server_context(TlsSettings(cert=str(tmp_path / "missing.pem")))
    key_only = tmp_path / "key.pem"
    pki.ca.issue_cert("x").private_key_pem.write_to_path(str(key_only))
    with pytest.raises(ConfigError, match="no PEM certificate in this file"):
        server_context(TlsSettings(cert=str(key_only)))
    with pytest.raises(ConfigError, match="--verify-client needs --cafile"):
        pki.settings(verify_client=True)
    with pytest.raises(ConfigError, match=r"1\.0 and 1\.1"):
        pki.settings(minimum_version="1.0")
    with pytest.raises(ConfigError, match="--ssl-ciphers"):
        server_context(pki.settings(ciphers="NO-SUCH-CIPHER"))


def test_cli_builds_tls_settings(pki: Pki) -> None:
    from trio_bridge.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["--cert", str(pki.server_file), "--ssl-only", "--ssl-version", "tlsv1_3", "6080", "h:1"]
    )
    config = config_from_args(args).bridge
    assert config.tls is not None
    assert config.tls.ssl_only and config.tls.minimum_version == "tlsv1_3"
    with pytest.raises(ConfigError, match="only with --cert"):
        config_from_args(parser.parse_args(["--ssl-only", "6080", "h:1"]))
    with pytest.raises(ConfigError, match="need --ssl-target"):
        config_from_args(parser.parse_args(["--ssl-target-no-verify", "6080", "h:1"]))


async def test_plain_refusal_under_tls_closes_tls_clients_without_plain_http(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki
) -> None:
    """A refusal before the handshake (limits) must not write plain HTTP into a TLS stream."""
    running = await start_bridge(
        echo_target.address, tls=pki.settings(), max_connections_per_address=1, limit_exempt=()
    )
    with trio.fail_after(10):
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:
            await check_echo(ws, b"the one allowed")
            # closed without an answer: no TLS handshake for a refused connection
            await tls_refused(wss(running.port), pki.client_context())
            response = await exchange(running.port, ws_request())
            assert response.status_code == 429


async def test_sighup_reloads_the_certificate_of_a_running_process(
    pki: Pki, echo_target: TcpTarget
) -> None:
    """The real command line: SIGHUP reaches the TLS context through the reload hooks."""
    port = free_port()
    argv = [sys.executable, "-m", "trio_bridge.cli", "--log", "stderr", "--cert"]
    argv += [str(pki.server_file), str(port), str(echo_target.address)]
    renewed = trustme.CA()
    with trio.fail_after(20):
        async with spawn(argv) as bridge:
            await bridge.wait_for_output("listening on")
            async with connect(wss(port), ssl=pki.client_context()) as ws:
                await check_echo(ws, b"before SIGHUP")
                pki.write_server(renewed.issue_cert("127.0.0.1"))
                bridge.signal(signal.SIGHUP)
                await bridge.wait_for_output("TLS: reloaded certificate")
                await check_echo(ws, b"the session survived the reload")
            async with connect(wss(port), ssl=pki.client_context(trust=renewed)) as ws:
                await check_echo(ws, b"after SIGHUP")


async def _hang_up(stream: trio.SocketStream) -> None:
    await stream.send_all(b"bye")


@pytest.mark.parametrize("case", ["target_closes", "idle_timeout", "client_closes"])
async def test_close_paths_over_tls(
    start_bridge: BridgeStarter,
    start_target: Callable[[Handler], Awaitable[TcpTarget]],
    pki: Pki,
    case: str,
) -> None:
    """The relay's close rules hold when the client end is a trio.SSLStream (one reader,
    one writer at a time: a second reader would raise BusyResourceError)."""
    target = await start_target(_hang_up if case == "target_closes" else echo)
    running = await start_bridge(target.address, tls=pki.settings(), idle_timeout=0.5)
    with trio.fail_after(10):
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:
            if case == "target_closes":
                assert await ws.recv() == b"bye"
                await ws.wait_closed()
                assert ws.close_code == 1000
            elif case == "idle_timeout":
                await ws.wait_closed()
                assert ws.close_code == 1001
            else:
                await check_echo(ws, b"then goodbye")
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:  # still serving
            if case == "target_closes":
                assert await ws.recv() == b"bye"
            else:
                await check_echo(ws, b"still serving")


# -- encrypted keys: --key-password from a file, the environment, a systemd credential ------


class EncryptedKey:
    """A certificate for 127.0.0.1 and its key, encrypted with a password, in two files."""

    def __init__(self, folder: Path, ca: trustme.CA) -> None:
        self.cert = folder / "cert.pem"
        self.key = folder / "key.pem"
        self.renew(ca, b"unused")

    def renew(self, ca: trustme.CA, password: bytes, *, traditional: bool = False) -> None:
        """A new certificate from ``ca``, its key encrypted with ``password`` (PKCS#8, or
        OpenSSL's traditional PEM with its Proc-Type header)."""
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if traditional
            else serialization.PrivateFormat.PKCS8
        )
        encryption = serialization.BestAvailableEncryption(password)
        self.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))

    def settings(self, source: str | None) -> TlsSettings:
        return TlsSettings(cert=str(self.cert), key=str(self.key), key_password=source)


@pytest.mark.parametrize("kind", ["file", "env", "credential"])
async def test_an_encrypted_key_opens_with_its_password_from(
    kind: str,
    start_bridge: BridgeStarter,
    echo_target: TcpTarget,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = secrets.token_urlsafe(16)
    key = EncryptedKey(tmp_path, pki.ca)
    key.renew(pki.ca, password.encode(), traditional=kind == "env")
    if kind == "file":
        (tmp_path / "password").write_text(password + "\n")  # as echo writes it
        source = f"file:{tmp_path / 'password'}"
    elif kind == "env":
        monkeypatch.setenv("TRIO_BRIDGE_TEST_KEY_PASSWORD", password)
        source = "env:TRIO_BRIDGE_TEST_KEY_PASSWORD"
    else:
        credentials = tmp_path / "credentials"  # what systemd's LoadCredential= makes
        credentials.mkdir()
        (credentials / "tls-key-password").write_text(password)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        source = "credential:tls-key-password"
    running = await start_bridge(echo_target.address, tls=key.settings(source))
    with trio.fail_after(10):
        async with connect(
            wss(running.port), ssl=pki.client_context(), subprotocols=[Subprotocol("binary")]
        ) as ws:
            await check_echo(ws, f"key password from {kind}".encode())


def test_key_password_errors_name_the_source_never_the_password(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = EncryptedKey(tmp_path, pki.ca)
    key.renew(pki.ca, b"correct horse")
    with pytest.raises(
        ConfigError, match="encrypted and trio-bridge cannot ask for its passphrase"
    ):
        server_context(key.settings(None))
    wrong, empty = tmp_path / "wrong", tmp_path / "empty"
    wrong.write_text("battery staple\n")
    empty.write_text("\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("TRIO_BRIDGE_TEST_UNSET", raising=False)
    cases = [
        (f"file:{wrong}", f"decrypted with the password from --key-password file:{wrong}"),
        (f"file:{tmp_path / 'nope'}", f"cannot read {tmp_path / 'nope'}: No such file"),
        (f"file:{empty}", f"--key-password file:{empty}: the password is empty"),
        ("env:TRIO_BRIDGE_TEST_UNSET", "the environment variable TRIO_BRIDGE_TEST_UNSET is not"),
        ("credential:tls-key", "$CREDENTIALS_DIRECTORY is not set"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigError) as failure:
            server_context(key.settings(source))
        text = str(failure.value)
        assert message in text and "\n" not in text, text
        assert "battery" not in text and "horse" not in text, text
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with pytest.raises(ConfigError, match=f"cannot read {credentials}/tls-key: No such file"):
        server_context(key.settings("credential:tls-key"))


@pytest.mark.parametrize(
    "source",
    ["correct horse", "file:", "env:", "env:1ABC", "env:A-B", "credential:", "credential:a/b",
     "credential:..", "vault:secret"],
)  # fmt: skip
def test_key_password_takes_a_source_never_a_password(source: str, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="expected file:PATH, env:NAME or credential:NAME") as bad:
        pki.settings(key_password=source)
    secret = source.partition(":")[2] if ":" in source else source
    assert not secret or secret not in str(bad.value)


async def test_reload_rereads_the_key_password(
    start_bridge: BridgeStarter, echo_target: TcpTarget, pki: Pki, tmp_path: Path
) -> None:
    key = EncryptedKey(tmp_path, pki.ca)
    password = tmp_path / "password"
    password.write_text("first password")
    key.renew(pki.ca, b"first password")
    running = await start_bridge(echo_target.address, tls=key.settings(f"file:{password}"))
    renewed = trustme.CA()

    async def reload() -> None:
        for hook in running.bridge.reload_hooks():
            await hook()

    with trio.fail_after(10):
        async with connect(wss(running.port), ssl=pki.client_context()) as ws:
            await check_echo(ws, b"first key")
        key.renew(renewed, b"second password")
        password.write_text("second password")
        await reload()
        async with connect(wss(running.port), ssl=pki.client_context(trust=renewed)) as ws:
            await check_echo(ws, b"second key, second password")
        # A password that no longer opens the key: reported, and the previous key kept.
        password.write_text("first password")
        with pytest.raises(ConfigError, match="wrong password"):
            await reload()
        async with connect(wss(running.port), ssl=pki.client_context(trust=renewed)) as ws:
            await check_echo(ws, b"kept")


async def test_the_command_line_reads_a_systemd_credential_and_rereads_it_on_sighup(
    pki: Pki, echo_target: TcpTarget, tmp_path: Path
) -> None:
    """``LoadCredential=tls-key-password:FILE`` in the unit, ``--key-password
    credential:tls-key-password`` in OPTIONS: the real process, wss://, then SIGHUP."""
    key = EncryptedKey(tmp_path, pki.ca)
    key.renew(pki.ca, b"first password")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tls-key-password").write_text("first password")
    port = free_port()
    argv = [sys.executable, "-m", "trio_bridge.cli", "--log", "stderr", "--cert", str(key.cert)]
    argv += ["--key", str(key.key), "--key-password", "credential:tls-key-password"]
    argv += [str(port), str(echo_target.address)]
    env = clean_env(CREDENTIALS_DIRECTORY=str(credentials))
    renewed = trustme.CA()
    with trio.fail_after(20):
        async with spawn(argv, env=env) as bridge:
            await bridge.wait_for_output("listening on")
            async with connect(wss(port), ssl=pki.client_context()) as ws:
                await check_echo(ws, b"before SIGHUP")
            key.renew(renewed, b"second password")
            (credentials / "tls-key-password").write_text("second password")
            bridge.signal(signal.SIGHUP)
            await bridge.wait_for_output("TLS: reloaded certificate")
            async with connect(wss(port), ssl=pki.client_context(trust=renewed)) as ws:
                await check_echo(ws, b"after SIGHUP")
    output = bridge.stderr
    assert "password" not in output.replace("--key-password", "").replace("key-password", "")
