"""Many sessions at once: open them, check each relays a message, hold them, close them.

One Trio task per session over raw Trio sockets and the same sans-I/O handshake and
frame parser as the single-session client, so the client side of 8,000 sessions costs
a few kilobytes each. Openings are limited to ``concurrency`` at a time so that the
proxy's listen backlog never overflows (websockify's is 100 and it forks per accept).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bench import wire
from bench.wsclient import (
    CONTROL_OPCODES,
    OP_CLOSE,
    Handshake,
    SessionFailed,
    binary_frame,
    close_frame,
    describe_close,
    parse_header,
)

TOKEN_SIZE = 16


@dataclass
class Tally:
    """How opening ``wanted`` sessions went, and what was measured while they were open."""

    wanted: int
    opened: int = 0  # handshake completed and one message echoed correctly
    failed: int = 0
    first_error: str = ""
    open_seconds: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)

    def fail(self, error: BaseException | str) -> None:
        self.failed += 1
        if not self.first_error:
            self.first_error = str(error) or type(error).__name__


async def _echo_once(sock: trio.socket.SocketType, token: bytes) -> None:
    """Send ``token`` in echo mode and read it back through the proxy."""
    await sock.send(binary_frame(wire.echo_start(token)))
    buffer = bytearray()
    got = b""
    while len(got) < len(token):
        data = await sock.recv(4096)
        if not data:
            raise SessionFailed("the proxy closed the TCP connection")
        buffer += data
        while (parsed := parse_header(buffer, 0, len(buffer))) is not None:
            opcode, length, size = parsed
            if len(buffer) < size + length:
                break
            payload = bytes(buffer[size : size + length])
            del buffer[: size + length]
            if opcode == OP_CLOSE:
                raise SessionFailed(describe_close(payload))
            if opcode not in CONTROL_OPCODES:
                got += payload
    if got != token:
        raise SessionFailed("the echo differs from the message sent")


async def _open(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        handshake = Handshake(port)
        await sock.send(handshake.request())
        while not handshake.feed(await sock.recv(4096)):
            pass
    except BaseException:
        sock.close()
        raise
    return sock


class _Sessions:
    def __init__(self, port: int, tally: Tally, concurrency: int, timeout: float) -> None:
        self.port = port
        self.tally = tally
        self.limiter = trio.CapacityLimiter(concurrency)
        self.timeout = timeout
        self.settled = 0
        self.all_settled = trio.Event()
        self.release = trio.Event()

    def _settle(self) -> None:
        self.settled += 1
        if self.settled == self.tally.wanted:
            self.all_settled.set()

    async def one(self, index: int) -> None:
        sock = None
        try:
            async with self.limiter:
                with trio.fail_after(self.timeout):
                    sock = await _open(self.port)
                    await _echo_once(sock, f"{index:0{TOKEN_SIZE}d}".encode())
            self.tally.opened += 1
        except (OSError, SessionFailed, trio.TooSlowError) as exc:
            self.tally.fail(exc)
        finally:
            self._settle()
        try:
            await self.release.wait()
            if sock is not None:
                with trio.move_on_after(1):
                    await sock.send(close_frame())
        except OSError:
            pass
        finally:
            if sock is not None:
                sock.close()


async def _run(
    port: int,
    count: int,
    concurrency: int,
    timeout: float,
    while_open: Callable[[], dict[str, Any]],
) -> Tally:
    tally = Tally(count)
    sessions = _Sessions(port, tally, concurrency, timeout)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(sessions.one, index)
        # Every task settles within its own timeout, once it gets its turn.
        with trio.move_on_after(timeout * (count / concurrency + 2)):
            await sessions.all_settled.wait()
        tally.open_seconds = time.perf_counter() - started
        if sessions.all_settled.is_set():
            await trio.sleep(0.5)  # let the proxy finish its own bookkeeping
            tally.measured = while_open()
        else:
            tally.first_error = tally.first_error or "opening did not finish in time"
            nursery.cancel_scope.cancel()
        sessions.release.set()
    return tally


def hold_sessions(
    port: int,
    count: int,
    while_open: Callable[[], dict[str, Any]],
    concurrency: int = 64,
    timeout: float = 30.0,
) -> Tally:
    """Open ``count`` echo-checked sessions, call ``while_open`` (e.g. read the proxy's
    memory) while all are open, then close them all."""
    return trio.run(_run, port, count, concurrency, timeout, while_open)
