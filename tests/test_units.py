"""The shipped unit files (systemd/): valid, hardened, and compatible with the bridge.

- ``systemd-analyze verify`` accepts every unit (warnings count as failures), on a copy
  whose ExecStart= points at this virtualenv's trio-bridge, since verify insists that
  the program exists and the units name /usr/local/bin/trio-bridge.
- ``systemd-analyze security --offline=true`` rates every service 2.0 or lower, and
  docs/systemd.md quotes the current score.
- The hardening does not break the bridge: every system call it makes, traced with
  strace(1) through start, a relayed session, reload and drain, is allowed by the
  units' SystemCallFilter=; no memory is mapped writable and executable
  (MemoryDenyWriteExecute=); only AF_INET, AF_INET6 and AF_UNIX sockets are created
  (RestrictAddressFamilies=).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from .conftest import TcpTarget
from .test_systemd import (
    BRIDGE,
    TIMEOUT,
    NotifySocket,
    activated,
    clean_env,
    loopback_listener,
    spawn,
    ws_connect,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "systemd.md"
INSTALLED_PATH = "/usr/local/bin/trio-bridge"
SERVICES = ["trio-bridge.service", "trio-bridge@.service", "trio-bridge-accept@.service"]
SOCKETS = ["trio-bridge.socket", "trio-bridge@.socket", "trio-bridge-accept.socket"]
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (package systemd) is missing"
)


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units as installed here: ExecStart= names this virtualenv's trio-bridge."""
    for unit in UNITS.iterdir():
        text = unit.read_text()
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_PATH, BRIDGE))
    return tmp_path


def test_the_shipped_units_are_all_tested() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(SERVICES + SOCKETS)


@needs_systemd_analyze
def test_systemd_analyze_verify_passes_without_warnings(installed_units: Path) -> None:
    # Templates are verified through an instance; each socket with its service.
    instances = [
        "trio-bridge.socket",
        "trio-bridge.service",
        "trio-bridge@6081.socket",
        "trio-bridge@6081.service",
        "trio-bridge-accept.socket",
        "trio-bridge-accept@1.service",
    ]
    result = analyze("verify", *(str(installed_units / name) for name in instances))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # verify exits 0 despite unknown keys


def exposure(service: Path) -> float:
    result = analyze("security", "--offline=true", str(service))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("service", SERVICES)
def test_security_exposure_is_at_most_2(service: str) -> None:
    score = exposure(UNITS / service)
    assert score <= MAX_EXPOSURE
    # docs/systemd.md quotes the score; keep it true.
    assert f"exposure level of **{score:.1f}**" in DOCS.read_text()


def hardening(service: str) -> list[str]:
    lines = [*(UNITS / service).read_text().splitlines(), ""]
    start = next(i for i, line in enumerate(lines) if line.startswith("# Hardening"))
    return lines[start : lines.index("", start)]


def test_every_service_has_the_same_hardening_and_command() -> None:
    first = hardening(SERVICES[0])
    assert "MemoryDenyWriteExecute=yes" in first and "DynamicUser=yes" in first
    for service in SERVICES[1:]:
        assert hardening(service) == first, service
    for service in SERVICES:
        text = (UNITS / service).read_text()
        assert f"ExecStart={INSTALLED_PATH} $OPTIONS $TARGET\n" in text


# -- what the bridge needs from the kernel, against what the units allow ---------------------


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every @group and its members."""
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls(service: str) -> set[str]:
    """The system calls SystemCallFilter= lets through (an allow list, then ~deny lists)."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for line in (UNITS / service).read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            if value.startswith("~"):
                allowed -= expand(value[1:].split(), groups)
            else:
                allowed |= expand(value.split(), groups)
    return allowed


TRACE_LINE = re.compile(r"^\d+\s+([a-z0-9_]+)\((.*)$")


def traced_calls(trace: str) -> Iterator[tuple[str, str]]:
    """(name, arguments) of every call started. With several threads, strace splits a
    call into "<unfinished ...>" and "<... name resumed>" lines; the first has the
    name and the leading arguments, so the resumed half is left out."""
    for line in trace.splitlines():
        match = TRACE_LINE.match(line)
        if match:
            yield match.group(1), match.group(2)


def _tracee_pid(strace_pid: int) -> int:
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    return int(children[0])


@needs_systemd_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
async def test_the_bridge_needs_nothing_the_hardening_forbids(
    echo_target: TcpTarget, tmp_path: Path
) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-", dir="/tmp") as short:  # AF_UNIX: 108 bytes
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify = NotifySocket(Path(short) / "n", sock)
        await notify.sock.bind(str(notify.path))
        calls = await trace_a_bridge(echo_target, notify, tmp_path / "trace")
    assert len(calls) > 1000, "strace saw too little"
    names = {name for name, _ in calls}
    assert {"accept4", "sendmsg"} <= names  # the paths of interest ran
    assert {"pwritev2", "fsync"} <= names  # and the recorder's (os.pwritev: pwritev2)

    for service in SERVICES:
        # A recorded session relays framed: the zero-copy path's call is checked here.
        forbidden = (names | {"splice"}) - allowed_syscalls(service)
        assert not forbidden, f"{service} would refuse {sorted(forbidden)}"
    writable_code = [
        args
        for name, args in calls
        if name in ("mmap", "mprotect", "pkey_mprotect")
        and "PROT_WRITE" in args
        and "PROT_EXEC" in args
    ]
    assert writable_code == []  # MemoryDenyWriteExecute=yes would refuse these
    families = {args.split(",")[0] for name, args in calls if name in ("socket", "socketpair")}
    assert families <= {"AF_UNIX", "AF_INET", "AF_INET6"}, families


async def trace_a_bridge(
    echo_target: TcpTarget, notify: NotifySocket, trace: Path
) -> list[tuple[str, str]]:
    """Every system call of an activated, recording bridge through start, a relayed
    (and recorded) session, SIGHUP and SIGTERM, with its arguments."""
    listener = loopback_listener()
    fds = [listener.fileno()]
    port = listener.getsockname()[1]
    env = clean_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000", LISTEN_FDNAMES="ws")
    # "localhost": name resolution is part of what is traced.
    recordings = trace.parent / "recordings"
    recordings.mkdir()
    bridge = [BRIDGE, "--record", str(recordings), f"localhost:{echo_target.address.port}"]
    argv = ["strace", "-f", "-qq", "-o", str(trace), *activated(fds, bridge)]
    with listener, trio.fail_after(TIMEOUT * 2):  # strace slows the start down
        async with trio.open_nursery() as nursery, spawn(argv, env=env, pass_fds=fds) as strace:
            nursery.start_soon(notify._receive_all)
            ready = await notify.wait_for("READY", "1")
            async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send(b"x" * 200_000)  # several reads and recorded batches
                received = 0
                while received < 200_000:
                    received += len(await ws.recv())
                pid = _tracee_pid(strace.process.pid)
                os.kill(pid, signal.SIGHUP)
                await notify.wait_for("READY", "1", after=ready)
                os.kill(pid, signal.SIGTERM)
                await notify.wait_for("STOPPING", "1", after=ready)
            assert await strace.exit_status() == 0
            nursery.cancel_scope.cancel()
    return list(traced_calls(await trio.Path(trace).read_text()))
