"""Starting and stopping the processes under test: the two proxies and the target.

One harness for both proxies: a :class:`ProxySpec` is only a name and a command line
(listen port, target port in; argv out). Everything else (start, readiness, logs,
measurement, shutdown) is the same code for both.

Every subprocess gets the raised descriptor limit and dies with the bench
(:func:`bench.procstat.child_setup`); each proxy leads its own process group, so
stopping it also reaches any forked child that survived its parent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from bench.procstat import child_setup, tree_pids

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
# trio-bridge refuses connections beyond --max-connections (default 1024) with 503;
# the 8,000-session run needs more. websockify has no such limit.
TRIO_BRIDGE_MAX_CONNECTIONS = 10_000


@dataclass(frozen=True)
class ProxySpec:
    name: str
    argv: Callable[[int, int], list[str]]  # (listen port, target port) -> command line
    package: str | None = None  # a package of this repository, frozen for the run


@contextlib.contextmanager
def frozen_source(package: str) -> Iterator[Path]:
    """A copy of ``package``'s source, taken now, for the proxy to import instead.

    The working tree may change while the bench runs (an editor saving, a branch
    switch); each round restarts the proxy, which would then mix versions. The copy
    is put first on the proxy's PYTHONPATH, ahead of the editable install.
    """
    with tempfile.TemporaryDirectory(prefix="bench-source-") as tmp:
        shutil.copytree(
            ROOT / package, Path(tmp) / package, ignore=shutil.ignore_patterns("__pycache__")
        )
        yield Path(tmp)


def _trio_bridge_argv(port: int, target_port: int) -> list[str]:
    script = Path(sys.executable).with_name("trio-bridge")
    exe = str(script) if script.exists() else shutil.which("trio-bridge") or "trio-bridge"
    max_conn = str(TRIO_BRIDGE_MAX_CONNECTIONS)
    return [exe, "--max-connections", max_conn, str(port), f"127.0.0.1:{target_port}"]


def _websockify_argv(port: int, target_port: int) -> list[str]:
    # No -v: websockify then logs a few lines per connection at INFO, which go to a file.
    return [sys.executable, "-m", "websockify", str(port), f"127.0.0.1:{target_port}"]


TRIO_BRIDGE = ProxySpec("trio-bridge", _trio_bridge_argv, package="trio_bridge")
WEBSOCKIFY = ProxySpec("websockify", _websockify_argv)
PROXIES = {spec.name: spec for spec in (TRIO_BRIDGE, WEBSOCKIFY)}


def recording(spec: ProxySpec, folder: Path) -> ProxySpec:
    """``spec`` (trio-bridge) recording every session to its own file in ``folder``."""
    return ProxySpec(
        f"{spec.name} --record",
        lambda port, target_port: [*spec.argv(port, target_port), "--record", str(folder)],
        package=spec.package,
    )


class StartError(RuntimeError):
    """A process under test did not come up; the message includes its log's tail."""


def free_port() -> int:
    """A port the kernel just had free on 127.0.0.1 (the machine is otherwise idle)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _listening(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def wait_for_tree_size(pid: int, members: int, timeout: float) -> bool:
    """Wait until the proxy's tree has at most ``members`` processes (its forked session
    handlers have exited and been reaped); False if that took longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(tree_pids(pid)) > members:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class RunningProxy:
    """A proxy subprocess listening on ``port`` and relaying to ``target_port``."""

    def __init__(
        self,
        spec: ProxySpec,
        target_port: int,
        log_path: Path,
        cpus: set[int] | None = None,
        nice: int = 0,
        source_root: Path | None = None,
    ) -> None:
        self.spec = spec
        self.source_root = source_root
        self.cpus = cpus
        self.nice = nice
        self.target_port = target_port
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> RunningProxy:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        env = None
        if self.spec.package and self.source_root:
            env = {**os.environ, "PYTHONPATH": str(self.source_root)}
        self._process = subprocess.Popen(
            self.spec.argv(self.port, self.target_port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=functools.partial(child_setup, self.cpus, self.nice),
            process_group=0,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(self.pid, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StartError(
                    f"{self.spec.name} did not start listening on {self.port}:\n"
                    + _log_tail(self.log_path)
                )
            time.sleep(0.05)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL for whatever is left of the tree."""
        process = self._process
        if process is None:
            return
        members = []
        for pid in tree_pids(process.pid)[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                members.append(psutil.Process(pid))
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        # Forked handlers are reparented when their parent exits; end any still running.
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(members, timeout=STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
        self._process = None


class TargetProcess:
    """The :mod:`bench.target` server; it exits when its stdin closes."""

    def __init__(self, cpus: set[int] | None = None, nice: int = 0) -> None:
        self.port = 0
        self.cpus = cpus
        self.nice = nice
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> TargetProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.target"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=functools.partial(child_setup, self.cpus, self.nice),
            process_group=0,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise StartError(f"the target did not start (said {line!r})")
        self.port = int(line)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
        process.stdout.close()
        self._process = None
