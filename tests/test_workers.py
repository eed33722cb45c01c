"""``--workers N``: one main process, N worker processes on the same listening sockets.

Real processes throughout: the bridge as its command line starts it, under the real
``systemd-socket-activate`` with a notify socket standing in for systemd, a real echo
target, websockets' client and the main process's own /metrics.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import ClientConnection

from trio_bridge.recording import load_recording

from .conftest import TcpTarget, free_port
from .test_systemd import (
    BRIDGE,
    TIMEOUT,
    Child,
    NotifySocket,
    check_relay,
    clean_env,
    needs_socket_activate,
    notify_socket,
    short_tmp,
    socket_activate,
    spawn,
    target_arg,
    ws_connect,
)

__all__ = ["notify_socket", "short_tmp"]  # fixtures used here, defined there

WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def worker_pids(child: Child) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the main process's log."""
    return {int(i): int(pid) for i, pid in WORKER_STARTED.findall(child.stderr)}


async def metric(port: int, name: str) -> float:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await trio.to_thread.run_sync(fetch)
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def process_gone(pid: int) -> None:
    """Wait for a process that is not our child to exit (a pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def open_sessions(stack: AsyncExitStack, url: str, count: int) -> list[ClientConnection]:
    sessions = [await stack.enter_async_context(ws_connect(url)) for _ in range(count)]
    for ws in sessions:
        await check_relay(ws)
    return sessions


@needs_socket_activate
async def test_workers_under_socket_activation_report_totals_and_drain(
    echo_target: TcpTarget, notify_socket: NotifySocket
) -> None:
    """The shipped units' way: one socket from systemd, ``--workers auto`` in OPTIONS."""
    workers = len(os.sched_getaffinity(0))  # what auto means here
    port, metrics_port = free_port(), free_port()
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="400000")
    argv = [BRIDGE, "--workers", "auto", "--metrics", str(metrics_port), target_arg(echo_target)]
    url = f"ws://127.0.0.1:{port}/"
    with trio.fail_after(TIMEOUT * 2):
        async with (
            socket_activate(
                [f"127.0.0.1:{port}"], argv, *(f"-E{k}={v}" for k, v in env.items())
            ) as bridge,
            AsyncExitStack() as stack,
        ):
            stack.callback(lambda: print(bridge.stderr))  # shown when the test fails
            sessions = await open_sessions(stack, url, 6)  # the first starts the bridge
            ready = await notify_socket.wait_for("READY", "1")
            in_workers = f"in {workers} workers"
            assert notify_socket.received[ready].fields["STATUS"].endswith(in_workers)
            await notify_socket.wait_for("STATUS", f"6 sessions open {in_workers}", after=ready)
            assert await metric(metrics_port, "trio_bridge_sessions_open") == 6
            assert len(worker_pids(bridge)) == workers

            bridge.signal(signal.SIGHUP)  # passed on: each worker reloads
            await bridge.wait_until(lambda text: text.count("reloading (") == workers)
            await notify_socket.wait_for("RELOADING", "1", after=ready)

            bridge.signal(signal.SIGTERM)
            stopping = await notify_socket.wait_for("STOPPING", "1", after=ready)
            await check_relay(sessions[0], b"relayed while the workers drain")
            watchdog = await notify_socket.wait_for("WATCHDOG", "1", after=stopping)
            assert watchdog > stopping  # still pinging: every worker still answers
            await stack.aclose()  # the clients leave; the drain ends
            assert await bridge.exit_status() == 0
    assert notify_socket.events() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert f"{workers} workers serving" in bridge.stderr


async def test_a_killed_worker_is_restarted_and_the_bridge_serves_on(
    echo_target: TcpTarget,
) -> None:
    port = free_port()
    argv = [BRIDGE, "--workers", "2", str(port), target_arg(echo_target)]
    url = f"ws://127.0.0.1:{port}/"
    with trio.fail_after(TIMEOUT * 2):
        async with spawn(argv, env=clean_env()) as bridge, AsyncExitStack() as stack:
            stack.callback(lambda: print(bridge.stderr))  # shown when the test fails
            await bridge.wait_for_output("2 workers serving")
            sessions = await open_sessions(stack, url, 8)
            first = worker_pids(bridge)
            os.kill(first[0], signal.SIGKILL)
            await bridge.wait_for_output("worker 0 exited with status -9; restarting it")
            await bridge.wait_until(lambda _: worker_pids(bridge)[0] != first[0])
            # The other worker's sessions relay on; the killed one's were cut, not hung.
            for ws in sessions:
                with suppress(ConnectionClosed):
                    await check_relay(ws, b"after a worker died")
            await open_sessions(stack, url, 4)  # new sessions are served
            await stack.aclose()
            bridge.signal(signal.SIGTERM)
            assert await bridge.exit_status() == 0
            for pid in worker_pids(bridge).values():
                await process_gone(pid)


async def test_every_workers_recordings_land_in_the_one_folder(
    echo_target: TcpTarget, tmp_path: Path
) -> None:
    port = free_port()
    argv = [BRIDGE, "--workers", "2", "--record", str(tmp_path), str(port), target_arg(echo_target)]
    with trio.fail_after(TIMEOUT * 2):
        async with spawn(argv, env=clean_env()) as bridge:
            await bridge.wait_for_output("2 workers serving")
            async with AsyncExitStack() as stack:
                await open_sessions(stack, f"ws://127.0.0.1:{port}/", 12)
            bridge.signal(signal.SIGTERM)  # each worker's recorder finishes its files
            assert await bridge.exit_status() == 0
    names = [name for name in os.listdir(tmp_path) if name.endswith(".tbrec")]
    recordings = [load_recording(tmp_path / name) for name in names]
    assert len(recordings) == 12
    assert all(r.status.complete for r in recordings)


async def test_per_address_limits_hold_across_workers(echo_target: TcpTarget) -> None:
    """One count per address for all workers: 3 sessions from 127.0.0.1 at most, not 3 per
    worker; a session that ends frees its place, whichever worker served it."""
    port = free_port()
    argv = [BRIDGE, "--workers", "2", "--limit-exempt", "none"]
    argv += ["--max-connections-per-address", "3", str(port), target_arg(echo_target)]
    url = f"ws://127.0.0.1:{port}/"
    with trio.fail_after(TIMEOUT * 2):
        async with spawn(argv, env=clean_env()) as bridge, AsyncExitStack() as stack:
            stack.callback(lambda: print(bridge.stderr))  # shown when the test fails
            await bridge.wait_for_output("2 workers serving")
            sessions = await open_sessions(stack, url, 3)
            for _ in range(6):  # each worker would take 3 more if it counted alone
                with pytest.raises(InvalidStatus) as refused:
                    async with ws_connect(url):
                        pass
                assert refused.value.response.status_code == 429
            await sessions[0].aclose()
            await bridge.wait_for_output(" ended: ")
            # The release reaches the main process just after the session's end; no
            # event tells this process when, so ask again until admitted (bounded).
            while True:
                try:
                    await open_sessions(stack, url, 1)
                    break
                except InvalidStatus as exc:
                    assert exc.response.status_code == 429
                    await trio.sleep(0.05)
            await stack.aclose()
            bridge.signal(signal.SIGTERM)
            assert await bridge.exit_status() == 0


async def test_workers_stop_when_the_main_process_is_killed(echo_target: TcpTarget) -> None:
    """No orphan keeps accepting on the shared socket with nobody supervising it."""
    port = free_port()
    argv = [BRIDGE, "--workers", "2", str(port), target_arg(echo_target)]
    with trio.fail_after(TIMEOUT):
        async with spawn(argv, env=clean_env()) as bridge:
            await bridge.wait_for_output("2 workers serving")
            pids = worker_pids(bridge)
            bridge.signal(signal.SIGKILL)
            for pid in pids.values():
                await process_gone(pid)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--workers", "0"], "'0' is not a number >= 1 or auto"),
        (["--workers", "2", "--", "sleep", "1"], "wrap mode runs one program"),
    ],
)
async def test_workers_option_errors_are_one_line(options: list[str], message: str) -> None:
    argv = [BRIDGE, *options[:2], str(free_port()), *options[2:]]
    with trio.fail_after(TIMEOUT):
        async with spawn(argv, env=clean_env()) as bridge:
            assert await bridge.exit_status() == 2
    assert message in bridge.stderr
    assert len(bridge.stderr.strip().splitlines()) == 1
