"""``trio-bridge`` as a subprocess: start, relay, signals, exit statuses, Unix sockets."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect, unix_connect
from websockets.typing import Subprotocol

from .conftest import TcpTarget, check_echo, echo, free_port

EXECUTABLE = Path(sys.executable).parent / "trio-bridge"


class BridgeProcess:
    """A running ``trio-bridge`` whose stderr is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._partial = b""

    async def _read_more(self) -> bool:
        assert self.process.stderr is not None
        chunk = await self.process.stderr.receive_some()
        if not chunk:
            return False
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode() for line in complete]
        return True

    async def wait_for_line(self, pattern: str) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails if the process exits first."""
        seen = 0
        while True:
            for line in self.lines[seen:]:
                match = re.search(pattern, line)
                if match:
                    return match
            seen = len(self.lines)
            if not await self._read_more():
                raise AssertionError(f"trio-bridge exited before logging {pattern!r}: {self.lines}")

    async def finish(self) -> tuple[int, list[str]]:
        """Wait for the exit; the status and every stderr line."""
        while await self._read_more():
            pass
        return await self.process.wait(), self.lines


@asynccontextmanager
async def cli(*args: str) -> AsyncIterator[BridgeProcess]:
    process = await trio.lowlevel.open_process(
        [str(EXECUTABLE), *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield BridgeProcess(process)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(EXECUTABLE), *args], capture_stdout=True, capture_stderr=True, check=False
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_starts_relays_and_exits_0_on_signal(
    echo_target: TcpTarget, signum: signal.Signals
) -> None:
    port = free_port()
    with trio.fail_after(20):
        async with cli(str(port), str(echo_target.address)) as bridge:
            await bridge.wait_for_line(rf"listening on 127\.0\.0\.1:{port}\b")
            async with connect(
                f"ws://127.0.0.1:{port}/", subprotocols=[Subprotocol("binary")]
            ) as ws:
                assert ws.subprotocol == "binary"
                await check_echo(ws, b"through a real process")
            await bridge.wait_for_line(r"session \w+ ended: .*close=1000")
            bridge.process.send_signal(signum)
            status, lines = await bridge.finish()
    assert status == 0, lines
    assert any(f"received {signum.name}" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


async def test_sigterm_closes_open_sessions_1001_after_grace(echo_target: TcpTarget) -> None:
    port = free_port()
    with trio.fail_after(20):
        async with cli("--shutdown-grace", "0.3", str(port), str(echo_target.address)) as bridge:
            await bridge.wait_for_line("listening on")
            async with connect(
                f"ws://127.0.0.1:{port}/", subprotocols=[Subprotocol("binary")]
            ) as ws:
                await check_echo(ws, b"open")
                bridge.process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.recv()
            status, lines = await bridge.finish()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1001
    assert status == 0, lines


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["1", "2", "3"],
        ["abc", "localhost:1"],
        ["6080", "localhost"],  # target without a port
        ["6080", "localhost:99999"],
        ["6080", "::1:22"],  # IPv6 without brackets
        ["--idle-timeout", "-1", "6080", "localhost:1"],
        ["--max-message-size", "lots", "6080", "localhost:1"],
        ["--no-such-option", "6080", "localhost:1"],
        ["--unix-target", "/tmp/x.sock", "6080", "localhost:1"],
        ["--unix-listen-mode", "600", "6080", "localhost:1"],
    ],
    ids=lambda args: " ".join(args) or "no-args",
)
async def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    with trio.fail_after(20):
        result = await run_cli(*args)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith("trio-bridge: error: ")
    assert result.stdout == b""


async def test_port_in_use_exits_1_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(20):
            result = await run_cli(str(port), "127.0.0.1:1")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert stderr.count("\n") == 1, stderr
    assert f"127.0.0.1:{port}" in stderr
    assert "in use" in stderr


async def test_help_exits_0_and_lists_unix_target() -> None:
    with trio.fail_after(20):
        result = await run_cli("--help")
    assert result.returncode == 0
    assert b"--unix-target" in result.stdout
    assert b"--unix-listen" in result.stdout
    assert result.stderr == b""


async def serve_unix_echo(
    path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await echo(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])
        task_status.started()


@pytest.mark.parametrize("unix", ["listen", "target", "both"])
async def test_unix_sockets_end_to_end(
    echo_target: TcpTarget, nursery: trio.Nursery, tmp_path: Path, unix: str
) -> None:
    listen_path = tmp_path / "ws.sock"
    target_path = tmp_path / "target.sock"
    port = free_port()
    args: list[str] = []
    if unix in ("listen", "both"):
        args += ["--unix-listen", str(listen_path)]
    else:
        args += [str(port)]
    if unix in ("target", "both"):
        await nursery.start(serve_unix_echo, target_path)
        args += ["--unix-target", str(target_path)]
    else:
        args += [str(echo_target.address)]
    with trio.fail_after(20):
        async with cli(*args) as bridge:
            listening = await bridge.wait_for_line(r"listening on (\S+), relaying to (\S+)")
            if unix == "target":
                assert listening[2] == f"unix:{target_path}"
            if unix == "listen":
                assert listening[1] == f"unix:{listen_path}"
                assert listen_path.is_socket()
            client = (
                unix_connect(str(listen_path), subprotocols=[Subprotocol("binary")])
                if unix in ("listen", "both")
                else connect(f"ws://127.0.0.1:{port}/", subprotocols=[Subprotocol("binary")])
            )
            async with client as ws:
                for size in (1, 125, 70_000):
                    await check_echo(ws, bytes(range(256)) * (size // 256) + b"x" * (size % 256))
            bridge.process.send_signal(signal.SIGTERM)
            status, lines = await bridge.finish()
    assert status == 0, lines


async def test_options_may_follow_the_positional_addresses(tmp_path: Path) -> None:
    """websockify users write ``PORT --web DIR TARGET``: options between positionals work."""
    (tmp_path / "index.html").write_text("hello")
    port = free_port()
    with trio.fail_after(15):
        async with cli(str(port), "--web", str(tmp_path), "127.0.0.1:9") as bridge:
            await bridge.wait_for_line("listening on")
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b"hello" not in reply:
                chunk = await stream.receive_some()
                assert chunk, reply
                reply += chunk
            await stream.aclose()
    assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "first, second",
    [
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
    ],
    ids=["SIGINT twice", "SIGTERM twice", "SIGTERM then SIGINT"],
)
async def test_a_second_signal_ends_the_drain_at_once(
    echo_target: TcpTarget, first: signal.Signals, second: signal.Signals
) -> None:
    """Ctrl-C twice: the second one used to wait in the signal queue for the whole grace
    (a minute here), then came out as a KeyboardInterrupt traceback with status 130."""
    port = free_port()
    with trio.fail_after(20):
        async with cli("--shutdown-grace", "60", str(port), str(echo_target.address)) as bridge:
            await bridge.wait_for_line("listening on")
            async with connect(
                f"ws://127.0.0.1:{port}/", subprotocols=[Subprotocol("binary")]
            ) as ws:
                await check_echo(ws, b"open")
                bridge.process.send_signal(first)
                await bridge.wait_for_line(r"shutting down: 1 connection\(s\) open")
                await check_echo(ws, b"still relaying while it drains")
                bridge.process.send_signal(second)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.recv()
            status, lines = await bridge.finish()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "server shutting down")
    assert status == 0, lines
    assert any(f"received {second.name} again" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


async def test_signals_during_the_shutdown_are_handled_until_the_end(
    echo_target: TcpTarget, tmp_path: Path
) -> None:
    """Signals are handled until the very end, not only until serving stops: one left
    in the queue would be raised as a KeyboardInterrupt once the bridge has finished."""
    port = free_port()
    with trio.fail_after(20):
        async with cli("--record", str(tmp_path), str(port), str(echo_target.address)) as bridge:
            await bridge.wait_for_line("listening on")
            bridge.process.send_signal(signal.SIGINT)
            await bridge.wait_for_line("received SIGINT")
            bridge.process.send_signal(signal.SIGINT)
            bridge.process.send_signal(signal.SIGINT)
            status, lines = await bridge.finish()
    assert status == 0, lines
    assert not any("Traceback" in line for line in lines), lines


def _pem_files(folder: Path) -> dict[str, str]:
    """A certificate, its key, another certificate's key, and a file that is not PEM."""
    ca = trustme.CA()
    issued, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    files = {
        "cert": issued.cert_chain_pems[0],
        "key": issued.private_key_pem,
        "other-key": other.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(folder / f"{name}.pem"))
    (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return {name: str(folder / f"{name}.pem") for name in files} | {
        "passwd": str(folder / "passwd")
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "not PEM", "no key", "key of another certificate", "key not PEM"],
)
async def test_certificate_problems_exit_1_with_one_line_a_person_can_act_on(
    tmp_path: Path, case: str
) -> None:
    """docs/cli.md: a bad certificate is a start-up failure (1), not bad arguments (2);
    and OpenSSL's "[ssl] pem lib ( ssl.c:3905)" was the only cause given."""
    pem = _pem_files(tmp_path)
    missing = str(tmp_path / "nonexistent.pem")
    args, expected = {
        "missing": (["--cert", missing], f"--cert {missing}: cannot read it: No such file"),
        "not PEM": (
            ["--cert", pem["passwd"]],
            f"--cert {pem['passwd']}: no PEM certificate in this file "
            "(expected -----BEGIN CERTIFICATE-----)",
        ),
        "no key": (
            ["--cert", pem["cert"]],
            f"--cert {pem['cert']}: no PEM private key in this file, and no --key names one",
        ),
        "key of another certificate": (
            ["--cert", pem["cert"], "--key", pem["other-key"]],
            f"--cert {pem['cert']} / --key {pem['other-key']}: "
            "the private key does not match the certificate",
        ),
        "key not PEM": (
            ["--cert", pem["cert"], "--key", pem["passwd"]],
            f"--key {pem['passwd']}: no PEM private key in this file",
        ),
    }[case]
    with trio.fail_after(20):
        result = await run_cli(*args, str(free_port()), "127.0.0.1:9")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"trio-bridge: {expected}"), stderr


async def test_a_good_certificate_and_key_still_start(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path)
    port = free_port()
    with trio.fail_after(20):
        async with cli("--cert", pem["cert"], "--key", pem["key"], str(port), "127.0.0.1:9") as b:
            await b.wait_for_line(rf"listening on 127\.0\.0\.1:{port}\b")
            b.process.send_signal(signal.SIGTERM)
            status, lines = await b.finish()
    assert status == 0, lines
