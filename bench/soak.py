"""The soak: thousands of sessions through one trio-bridge for minutes, every byte checked.

``./dev bench --soak`` (``python -m bench --soak``) starts trio-bridge as a subprocess
(the frozen source, like the benchmark) in front of the echo target
(:mod:`bench.target`), then, from this one Trio process:

- ``--soak-sessions`` small sessions (3,000), each sending one binary message of random
  size (16-512 bytes, random content) every ``--soak-interval`` seconds on average
  (1.9 s, uniform jitter of +-50%) and checking the echo byte for byte before the next;
- ``--soak-bulk`` bulk sessions (2), each pushing 64 KiB frames continuously (paced to
  ``--soak-bulk-rate`` MiB/s, 8 by default; 0 is as fast as it goes) and reading the
  echo back at the same time, checked against the same deterministic stream: byte ``i``
  of a bulk stream is ``PATTERN[i % len(PATTERN)]``, a random pattern whose length is a
  prime (1,048,573), so a lost, repeated or reordered chunk of any power-of-two size (a
  read, a pipe, a frame) shows as a mismatch;

for ``--soak-minutes`` minutes (10) counted from the moment every session is open.
Every ~10 s it samples the bridge's RSS (``/proc/PID/status``), descriptor count
(``/proc/PID/fd``) and CPU time. At the end each session sends a close frame (1000)
and expects the bridge's echo of it; anything else that ended a session before then is
an *unexpected close*, reported with its close code (or how the connection dropped).
The client answers the bridge's pings (its --heartbeat) as a browser would.

The goal: nothing lost (every message sent was echoed intact, every bulk byte came
back), no unexpected close, and RSS growth below 1% per 10 minutes after the warm-up
(the first minute), judged on the least-squares slope of the samples after it.

Everything is bounded: each echo has ``ECHO_TIMEOUT``, each opening ``OPEN_TIMEOUT``,
the closing handshakes ``CLOSE_TIMEOUT``, and the whole Trio run a deadline derived
from the duration; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from websockets.frames import Frame, Opcode

from bench.procstat import CLOCK_TICKS, machine_busy_seconds, own_cpu_seconds, raise_fd_limit
from bench.proxies import ROOT, ProxySpec, RunningProxy, TargetProcess, frozen_source
from bench.proxies import TRIO_BRIDGE as BRIDGE_SPEC
from bench.report import machine
from bench.sessions import _open as open_session
from bench.wire import MODE_ECHO
from bench.wsclient import (
    CONTROL_OPCODES,
    LENGTH16,
    OP_CLOSE,
    SessionFailed,
    binary_frame,
    close_frame,
    parse_header,
)

RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
OP_PING = Opcode.PING.value

SAMPLE_EVERY = 10.0  # seconds between samples of the bridge (less in runs under 200 s)
WARMUP = 60.0  # seconds after the soak starts before RSS growth is judged
RSS_GOAL = 1.0  # % per 10 minutes, after the warm-up
STEP_MIB = 0.25  # RSS changes between two samples reported one by one
OPEN_CONCURRENCY = 64  # openings at a time (the bridge's listen backlog is not the test)
OPEN_TIMEOUT = 30.0
ECHO_TIMEOUT = 30.0  # for one small message's echo; more is a lost message
DRAIN_TIMEOUT = 30.0  # for a bulk session's last bytes once it stops sending
CLOSE_TIMEOUT = 10.0  # for the bridge's answer to our close frame
SETTLE = 2.0  # seconds after the last close before the "after close" sample
MIN_SIZE, MAX_SIZE = 16, 512
BULK_FRAME = 64 * 1024
BULK_WINDOW = 4 * MIB  # bytes a bulk session may have in flight (the target holds 4 MiB)
BULK_BUFFER = 256 * 1024
PATTERN_SIZE = 1_048_573  # a prime: no chunk size of the relay divides it
RECV_SIZE = 4096
HIST_BASE = 1.01  # round-trip histogram: buckets 1% wide
HIST_K = 1 / math.log(HIST_BASE)
PIPE_POOL = 16  # empty pipes trio_bridge.pipes keeps for reuse (two descriptors each)
FD_RESERVE = 200  # descriptors besides the sessions (pipes, logs, listeners, /proc reads)


@dataclass(frozen=True)
class SoakOptions:
    sessions: int = 3000
    minutes: float = 10.0
    bulk: int = 2
    interval: float = 1.9  # mean seconds between two messages of a small session
    bulk_rate: float = 8.0  # MiB/s per bulk session, each way; 0: unpaced
    seed: int = 1
    bridge_args: tuple[str, ...] = ()  # more arguments for the bridge (e.g. --heartbeat=0)

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def warmup(self) -> float:
        """The first minute, or the first half of a run shorter than two minutes."""
        return min(WARMUP, self.seconds / 2)

    @property
    def sample_every(self) -> float:
        return min(SAMPLE_EVERY, max(1.0, self.seconds / 20))

    @property
    def max_connections(self) -> int:
        return max(1024, self.sessions + self.bulk + 100)


class Ended(Exception):
    """A session ended before its time, or a check failed; ``kind`` groups the report."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def close_ended(payload: bytes) -> Ended:
    if len(payload) >= 2:
        code = LENGTH16.unpack_from(payload)[0]
        return Ended(f"close {code}", payload[2:].decode(errors="replace"))
    return Ended("close without a code (1005)")


def os_ended(exc: OSError) -> Ended:
    name = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return Ended(f"connection error: {name}", str(exc))


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def pong_frame(payload: bytes) -> bytes:
    return Frame(Opcode.PONG, payload).serialize(mask=True)


class Reader:
    """Whole frames from a session's socket (small payloads; one buffer per session).

    Pings are answered as they are read, that is while a small session waits for an
    echo or for the answer to its close: within one message interval (under 3 s by
    default), far inside any sensible --heartbeat timeout.
    """

    def __init__(self, sock: trio.socket.SocketType, tally: Tally) -> None:
        self.sock = sock
        self.tally = tally
        self.buffer = bytearray()

    async def frame(self) -> tuple[int, bytes]:
        buffer = self.buffer
        while True:
            parsed = parse_header(buffer, 0, len(buffer))
            if parsed is not None:
                opcode, length, size = parsed
                if len(buffer) >= size + length:
                    payload = bytes(buffer[size : size + length])
                    del buffer[: size + length]
                    if opcode == OP_PING:
                        await send_all(self.sock, pong_frame(payload))
                        self.tally.pongs += 1
                        continue
                    return opcode, payload
            data = await self.sock.recv(RECV_SIZE)
            if not data:
                raise Ended("TCP closed without a close frame")
            buffer += data

    async def expect(self, payload: bytes) -> None:
        """Read data frames until ``len(payload)`` bytes came back; they must be it."""
        got = b""
        while len(got) < len(payload):
            opcode, data = await self.frame()
            if opcode == OP_CLOSE:
                raise close_ended(data)
            if opcode not in CONTROL_OPCODES:
                got += data
        if got != payload:
            raise Ended("echo differs", f"sent {len(payload)} bytes, got {len(got)}")


async def close_handshake(sock: trio.socket.SocketType, reader: Reader) -> str:
    """Send close 1000 and wait for the bridge's close frame: its code, or what happened."""
    try:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await send_all(sock, close_frame(1000))
            while True:
                opcode, data = await reader.frame()
                if opcode == OP_CLOSE:
                    return close_ended(data).kind
                if opcode not in CONTROL_OPCODES:
                    return "data after our close frame"
        return "no answer to our close frame"
    except Ended as exc:
        return exc.kind
    except OSError as exc:
        return os_ended(exc).kind


class Histogram:
    """Round trips in buckets 1% wide: bounded memory for any number of messages."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        us = max(seconds * 1e6, 1.0)
        self.counts[int(math.log(us) * HIST_K)] += 1
        self.n += 1
        self.max = max(self.max, us)

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.n += other.n
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """Microseconds (the bucket's middle), or None when empty."""
        if not self.n:
            return None
        rank = q * (self.n - 1)
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen > rank:
                return float(math.exp((bucket + 0.5) / HIST_K))
        return self.max


@dataclass
class Bulk:
    index: int
    sent: int = 0  # payload bytes sent (after the mode byte)
    verified: int = 0  # bytes echoed back and equal to the stream
    sender_done: bool = False
    ended: str = ""  # empty: ran to the end and closed cleanly
    progress: trio.Event = field(default_factory=trio.Event, repr=False)  # bytes verified
    sending: trio.Lock = field(default_factory=trio.Lock, repr=False)  # frames, pongs

    def report(self) -> dict[str, Any]:
        return {"index": self.index, "sent": self.sent, "verified": self.verified,
                "ended": self.ended or "closed at the end"}  # fmt: skip


@dataclass
class Tally:
    opened: int = 0
    open_failed: Counter[str] = field(default_factory=Counter)
    live: int = 0  # small sessions opened and not ended
    sent: int = 0
    verified: int = 0
    unexpected: Counter[str] = field(default_factory=Counter)  # how sessions ended early
    examples: list[str] = field(default_factory=list)  # the first few, with the time
    closing: Counter[str] = field(default_factory=Counter)  # the bridge's answer to our close
    pongs: int = 0  # the bridge's pings answered (its --heartbeat)
    window: Histogram = field(default_factory=Histogram)  # since the last sample
    rtt: Histogram = field(default_factory=Histogram)  # whole run

    def note(self, kind: str, detail: str, at: float) -> None:
        self.unexpected[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"t={at:.1f}s {kind}: {detail}")


def pattern(seed: int) -> bytes:
    """Two copies of the bulk stream's period, so any slice up to a period is one slice."""
    period = random.Random(seed).randbytes(PATTERN_SIZE)
    return period + period


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def fd_kinds(pid: int) -> Counter[str]:
    """The descriptors of ``pid`` by kind: socket, pipe, or other (files, epoll, ...)."""
    kinds: Counter[str] = Counter(socket=0, pipe=0, other=0)
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            link = os.readlink(f"{folder}/{name}")
        except FileNotFoundError:  # closed meanwhile
            continue
        kinds[link.split(":", 1)[0] if link.startswith(("socket:", "pipe:")) else "other"] += 1
    return kinds


class Soak:
    def __init__(self, opts: SoakOptions, port: int, bridge_pid: int, target_pid: int) -> None:
        self.opts = opts
        self.port = port
        self.bridge_pid = bridge_pid
        self.target_pid = target_pid
        self.tally = Tally()
        self.bulks = [Bulk(i) for i in range(opts.bulk)]
        self.rng = random.Random(opts.seed)
        self.stream = pattern(opts.seed)
        self.limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
        self.deadline = math.inf  # trio time; set once every session has settled
        self.start = 0.0  # trio time the soak started (every session settled)
        self.opened_at = 0.0  # trio time the first session began to open
        self.settled = 0
        self.all_settled = trio.Event()
        self.samples: list[dict[str, Any]] = []
        self.bridge_gone = ""
        self._last_cpu: tuple[float, ...] | None = None

    # -- time -----------------------------------------------------------------

    def t(self) -> float:
        """Seconds since the soak started (negative while sessions are still opening)."""
        return trio.current_time() - (self.start or self.opened_at)

    def _settle(self) -> None:
        self.settled += 1
        if self.settled == self.opts.sessions + self.opts.bulk:
            self.all_settled.set()

    async def _open(self) -> tuple[trio.socket.SocketType | None, str]:
        try:
            async with self.limiter:
                with trio.fail_after(OPEN_TIMEOUT):
                    return await open_session(self.port), ""
        except trio.TooSlowError:
            return None, f"not open within {OPEN_TIMEOUT:g} s"
        except SessionFailed as exc:
            return None, str(exc)
        except OSError as exc:
            return None, os_ended(exc).kind
        finally:
            self._settle()

    # -- small sessions -------------------------------------------------------

    async def small(self) -> None:
        tally, rng, opts = self.tally, self.rng, self.opts
        sock, error = await self._open()
        if sock is None:
            tally.open_failed[error] += 1
            return
        tally.opened += 1
        tally.live += 1
        reader = Reader(sock, tally)
        lo, hi = opts.interval * 0.5, opts.interval * 1.5
        try:
            try:
                await trio.sleep(rng.uniform(0, opts.interval))  # spread the sessions
                prefix = bytes([MODE_ECHO])  # the target's mode byte, once
                while True:
                    payload = rng.randbytes(rng.randint(MIN_SIZE, MAX_SIZE))
                    frame = binary_frame(prefix + payload)
                    prefix = b""
                    tally.sent += 1
                    began = time.perf_counter()
                    try:
                        with trio.fail_after(ECHO_TIMEOUT):
                            await send_all(sock, frame)
                            await reader.expect(payload)
                    except trio.TooSlowError:
                        raise Ended(f"no echo within {ECHO_TIMEOUT:g} s") from None
                    tally.window.add(time.perf_counter() - began)
                    tally.verified += 1
                    wake = trio.current_time() + rng.uniform(lo, hi)
                    if wake >= self.deadline:
                        break
                    await trio.sleep_until(wake)
                # The soak is over: close within a second of its end, spread out.
                await trio.sleep_until(self.deadline + rng.uniform(0, 1.0))
                tally.closing[await close_handshake(sock, reader)] += 1
            except OSError as exc:
                raise os_ended(exc) from exc
        except Ended as exc:
            tally.note(exc.kind, exc.detail, self.t())
        finally:
            tally.live -= 1
            sock.close()

    # -- bulk sessions --------------------------------------------------------

    async def bulk(self, state: Bulk) -> None:
        sock, error = await self._open()
        if sock is None:
            self.tally.open_failed[error] += 1
            state.ended = f"not opened: {error}"
            return
        drained = trio.Event()
        try:
            try:
                await send_all(sock, binary_frame(bytes([MODE_ECHO])))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._bulk_receive, sock, state, drained)
                    await self._bulk_send(sock, state)
                    state.sender_done = True
                    if state.verified == state.sent:
                        drained.set()
                    try:
                        with trio.fail_after(DRAIN_TIMEOUT):
                            await drained.wait()
                    except trio.TooSlowError:
                        lost = state.sent - state.verified
                        raise Ended(
                            f"bulk echo incomplete after {DRAIN_TIMEOUT:g} s", f"{lost} B missing"
                        ) from None
                    nursery.cancel_scope.cancel()  # the receiver waits for bytes none owe
                answer = await close_handshake(sock, Reader(sock, self.tally))
                self.tally.closing[answer] += 1
            except OSError as exc:
                raise os_ended(exc) from exc
        except Ended as exc:
            state.ended = str(exc)
            self.tally.note(f"bulk: {exc.kind}", exc.detail, self.t())
        finally:
            sock.close()

    async def _bulk_send(self, sock: trio.socket.SocketType, state: Bulk) -> None:
        view = memoryview(self.stream)
        rate = self.opts.bulk_rate * MIB
        began = trio.current_time()
        while trio.current_time() < self.deadline:
            while state.sent - state.verified > BULK_WINDOW:
                state.progress = trio.Event()
                await state.progress.wait()
            offset = state.sent % PATTERN_SIZE
            frame = Frame(Opcode.BINARY, view[offset : offset + BULK_FRAME]).serialize(mask=True)
            # Counted before sending: the echo may come back before send() returns.
            state.sent += BULK_FRAME
            async with state.sending:
                await send_all(sock, frame)
            if rate:
                due = began + state.sent / rate
                if due > trio.current_time():
                    await trio.sleep_until(min(due, self.deadline))

    async def _bulk_receive(
        self, sock: trio.socket.SocketType, state: Bulk, drained: trio.Event
    ) -> None:
        """Parse frames as a stream (payloads may be larger than the buffer) and check
        every payload byte against the stream at its position."""
        buf = bytearray(BULK_BUFFER)
        view = memoryview(buf)
        stream = self.stream
        start = end = 0
        left = 0  # payload bytes still to come in the current data frame
        while True:
            if left == 0 and start < end:
                parsed = parse_header(buf, start, end)
                if parsed is not None:
                    opcode, length, size = parsed
                    if opcode in CONTROL_OPCODES:
                        if end - start >= size + length:
                            payload = bytes(view[start + size : start + size + length])
                            start += size + length
                            if opcode == OP_CLOSE:
                                raise close_ended(payload)
                            if opcode == OP_PING:
                                async with state.sending:
                                    await send_all(sock, pong_frame(payload))
                                self.tally.pongs += 1
                            continue
                    else:
                        start += size
                        left = length
                        continue
            elif left and start < end:
                n = min(left, end - start)
                offset = state.verified % PATTERN_SIZE
                if bytes(view[start : start + n]) != stream[offset : offset + n]:
                    raise Ended("bulk stream differs", f"at byte {state.verified} (+{n})")
                start += n
                left -= n
                state.verified += n
                state.progress.set()
                if state.verified > state.sent:
                    raise Ended("bulk echo longer than sent", f"{state.verified} > {state.sent}")
                if state.sender_done and state.verified == state.sent:
                    drained.set()
                continue
            # Need more bytes: compact, then read.
            if start == end:
                start = end = 0
            elif end == len(buf):
                buf[: end - start] = buf[start:end]
                start, end = 0, end - start
            n = await sock.recv_into(view[end:])
            if n == 0:
                raise Ended("TCP closed without a close frame")
            end += n

    # -- sampling -------------------------------------------------------------

    def sample(self, label: str = "") -> dict[str, Any]:
        pid = self.bridge_pid
        try:
            status = read_status(pid)
            kinds = fd_kinds(pid)
        except (FileNotFoundError, ProcessLookupError):
            self.bridge_gone = self.bridge_gone or f"the bridge was gone at t={self.t():.0f} s"
            return {}
        now = time.monotonic()
        cpu = (
            now,
            own_cpu_seconds(pid),
            own_cpu_seconds(self.target_pid),
            _self_cpu(),
            machine_busy_seconds(),
        )
        shares = {}
        if self._last_cpu is not None and now > self._last_cpu[0]:
            wall = now - self._last_cpu[0]
            used = [(cpu[i] - self._last_cpu[i]) / wall for i in range(1, 5)]
            shares = {
                "bridge_cpu": round(used[0], 3),
                "target_cpu": round(used[1], 3),
                "client_cpu": round(used[2], 3),
                # Everything else on the machine (other engineers' tests, the kernel's
                # softirq threads), in cores: the noise the latencies above suffered.
                "others_cpu": round(max(0.0, used[3] - sum(used[:3])), 3),
            }
        self._last_cpu = cpu
        window = self.tally.window
        self.tally.rtt.merge(window)
        self.tally.window = Histogram()
        p99 = window.quantile(0.99)
        row = {
            "t": round(self.t(), 1),
            "label": label,
            "rss_kib": status.get("VmRSS", 0),
            "hwm_kib": status.get("VmHWM", 0),
            "fds": sum(kinds.values()),
            "sockets": kinds["socket"],
            "pipes": kinds["pipe"],
            "bridge_cpu_s": round(cpu[1], 2),
            **shares,
            "live_sessions": self.tally.live,
            "messages_verified": self.tally.verified,
            "window_messages": window.n,
            "window_p99_us": round(p99) if p99 is not None else None,
            "bulk_verified": sum(b.verified for b in self.bulks),
            "unexpected": sum(self.tally.unexpected.values()),
        }
        self.samples.append(row)
        return row

    async def sampler(self) -> None:
        """Every ``sample_every`` s from the start, and once just before the deadline
        (the sessions close in the second after it)."""
        every = self.opts.sample_every
        k = 1
        while True:
            at = min(self.start + k * every, self.deadline - 0.05)
            await trio.sleep_until(at)
            row = self.sample()
            if row:
                _progress(row)
            if at >= self.deadline - 0.05:
                return
            k += 1

    # -- the whole run --------------------------------------------------------

    async def run(self) -> None:
        opts = self.opts
        self.opened_at = trio.current_time()
        self.sample("before opening")
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as sessions:
                for state in self.bulks:
                    sessions.start_soon(self.bulk, state)
                for _ in range(opts.sessions):
                    sessions.start_soon(self.small)
                with trio.move_on_after(OPEN_TIMEOUT * (opts.sessions / OPEN_CONCURRENCY + 2)):
                    await self.all_settled.wait()
                self.start = trio.current_time()
                self.samples[0]["t"] = round(self.opened_at - self.start, 1)
                self.deadline = self.start + opts.seconds
                _log(
                    f"soak: {self.tally.opened} of {opts.sessions + opts.bulk} sessions open "
                    f"({sum(self.tally.open_failed.values())} failed); "
                    f"running {opts.minutes:g} min"
                )
                self.sample("all open")
                outer.start_soon(self.sampler)
                # Sessions end on their own after the deadline; this bounds a stuck one.
                sessions.cancel_scope.deadline = (
                    self.deadline + 1.0 + max(ECHO_TIMEOUT, DRAIN_TIMEOUT) + CLOSE_TIMEOUT
                )
            if sessions.cancel_scope.cancelled_caught:
                self.tally.note("session still running at the hard stop", "", self.t())
            self.sample("end")  # every session closed
            outer.cancel_scope.cancel()
        await trio.sleep(SETTLE)  # the bridge closes target sockets and ends its tasks
        self.sample(f"{SETTLE:g} s after close")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(row: dict[str, Any]) -> None:
    _log(
        f"t={row['t']:6.0f}s rss={row['rss_kib'] / 1024:7.2f} MiB fds={row['fds']:5d} "
        f"live={row['live_sessions']:5d} verified={row['messages_verified']:8d} "
        f"p99={row['window_p99_us']} us bulk={row['bulk_verified'] / MIB:8.0f} MiB "
        f"bridge={row.get('bridge_cpu', 0):.0%} client={row.get('client_cpu', 0):.0%} "
        f"target={row.get('target_cpu', 0):.0%} others={row.get('others_cpu', 0):.0%} "
        f"unexpected={row['unexpected']}"
    )


# -- analysis and report ------------------------------------------------------


def rss_trend(samples: list[dict[str, Any]], after: float) -> dict[str, float] | None:
    """Least-squares slope of RSS over the samples from ``after`` s to the end of the
    soak (sessions all open), as MiB/min and as % of the RSS then, per 10 minutes."""
    points = [
        (s["t"], s["rss_kib"] / 1024) for s in samples if s["label"] == "" and s["t"] >= after
    ]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / var  # MiB/s
    base = points[0][1]
    span = points[-1][0] - points[0][0]
    steps = [
        [t1, round(r1 - r0, 3)]
        for (_, r0), (t1, r1) in itertools.pairwise(points)
        if abs(r1 - r0) >= STEP_MIB
    ]
    return {
        "steps": steps,
        "from_t": points[0][0],
        "to_t": points[-1][0],
        "samples": n,
        "rss_start_mib": base,
        "rss_end_mib": points[-1][1],
        "slope_mib_per_min": slope * 60,
        "growth_pct_per_10min": slope * 600 / base * 100,
        "endpoint_pct_per_10min": (points[-1][1] - base) / base * 100 * 600 / span,
    }


CLOSE_LINE = re.compile(r"ended: .* close=(\S+) by (\S+) \((.*)\)$")


def scan_log(path: Path) -> dict[str, Any]:
    """The bridge's log: how it says each session ended, and any warning or error."""
    ends: Counter[str] = Counter()
    problems: list[str] = []
    count = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        match = CLOSE_LINE.search(line)
        if match:
            ends[f"close={match[1]} by {match[2]} ({match[3]})"] += 1
        elif re.search(r"WARNING|ERROR|CRITICAL|Traceback|Exception", line):
            count += 1
            if len(problems) < 10:
                problems.append(line)
    return {"session_ends": dict(ends), "problem_lines": count, "first_problems": problems}


def summarise(soak: Soak, log: dict[str, Any]) -> dict[str, Any]:
    opts, tally = soak.opts, soak.tally
    samples = soak.samples
    during = [s for s in samples if s["label"] in ("", "all open")]
    before = next((s for s in samples if s["label"] == "before opening"), {})
    after = samples[-1] if samples and samples[-1]["label"].endswith("after close") else {}
    trend = rss_trend(samples, opts.warmup)
    bulk_sent = sum(b.sent for b in soak.bulks)
    bulk_verified = sum(b.verified for b in soak.bulks)
    expected_clean = opts.sessions + opts.bulk
    clean = tally.closing.get("close 1000", 0)
    lost = tally.sent - tally.verified + (bulk_sent - bulk_verified)
    unexpected = sum(tally.unexpected.values()) + sum(tally.open_failed.values())
    checks = {
        "nothing lost": lost == 0 and tally.sent > 0 and not soak.bridge_gone,
        "no unexpected close": unexpected == 0 and clean == expected_clean,
        f"RSS growth < {RSS_GOAL:g}% per 10 min after warm-up": (
            trend is not None and trend["growth_pct_per_10min"] < RSS_GOAL
        ),
    }
    return {
        "sessions_wanted": expected_clean,
        "sessions_opened": tally.opened + sum(not b.ended.startswith("not") for b in soak.bulks),
        "open_failed": dict(tally.open_failed),
        "messages_sent": tally.sent,
        "messages_verified": tally.verified,
        "messages_lost": tally.sent - tally.verified,
        "rtt_p50_us": tally.rtt.quantile(0.5),
        "rtt_p99_us": tally.rtt.quantile(0.99),
        "rtt_max_us": tally.rtt.max,
        "bulk_bytes_sent": bulk_sent,
        "bulk_bytes_verified": bulk_verified,
        "bulk": [b.report() for b in soak.bulks],
        "unexpected": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "closing_answers": dict(tally.closing),
        "clean_closes": clean,
        "pongs": tally.pongs,
        "rss_before_mib": before.get("rss_kib", 0) / 1024,
        "rss_peak_mib": max((s.get("hwm_kib", 0) for s in samples), default=0) / 1024,
        "rss_trend": trend,
        "fds_before": before.get("fds"),
        "fds_max": max((s["fds"] for s in during), default=None),
        "fds_after_close": after.get("fds"),
        "sockets_before": before.get("sockets"),
        "sockets_after_close": after.get("sockets"),
        "pipes_after_close": after.get("pipes"),
        "bridge_cpu_s": samples[-1]["bridge_cpu_s"] if samples else None,
        "bridge_gone": soak.bridge_gone,
        "log": log,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def series_table(samples: list[dict[str, Any]], rows: int = 12, markdown: bool = False) -> str:
    """A few rows of the time series: the labelled ones and evenly spaced others."""
    plain = [i for i, s in enumerate(samples) if not s["label"]]
    step = max(1, math.ceil(len(plain) / rows))
    keep = {i for i, s in enumerate(samples) if s["label"]} | set(plain[::step])
    if plain:
        keep.add(plain[-1])
    header = [
        "t (s)", "", "bridge RSS (MiB)", "fds", "bridge CPU", "client + target CPU",
        "other programs' CPU",
        "sessions", "messages verified", "p99 (us, last 10 s)", "bulk MiB verified",
    ]  # fmt: skip
    lines = [header]
    for i in sorted(keep):
        s = samples[i]
        cpu = s.get("bridge_cpu")
        load = s.get("client_cpu", 0) + s.get("target_cpu", 0) if cpu is not None else None
        others = s.get("others_cpu")
        t = f"{s['t']:.1f}" if s["t"] < 0 else f"{s['t']:.0f}"
        lines.append([
            t, s["label"], _mib(s["rss_kib"]), str(s["fds"]),
            "-" if cpu is None else f"{cpu:.0%}", "-" if load is None else f"{load:.0%}",
            "-" if others is None else f"{others:.0%}",
            str(s["live_sessions"]), f"{s['messages_verified']:,}",
            "-" if s["window_p99_us"] is None else str(s["window_p99_us"]),
            f"{s['bulk_verified'] / MIB:,.0f}",
        ])  # fmt: skip
    return _table(lines, markdown)


def _table(lines: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _steps(steps: list[list[float]]) -> str:
    """How RSS moved after the warm-up: a count each way and the largest rise."""
    if not steps:
        return "none"
    ups = [d for _, d in steps if d > 0]
    downs = [d for _, d in steps if d < 0]
    t, largest = max(steps, key=lambda step: step[1])
    text = f"{len(ups)} up (+{sum(ups):.2f} MiB), {len(downs)} down ({sum(downs):.2f} MiB)"
    return text + (f"; largest +{largest:.2f} MiB at t={t:.0f} s" if ups else "")


def summary_table(summary: dict[str, Any], opts: SoakOptions, markdown: bool = False) -> str:
    def fmt(v: float | None, spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    def met(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    checks = list(summary["checks"].values())
    fds_ok = summary["sockets_before"] == summary["sockets_after_close"] and (
        (summary["pipes_after_close"] or 0) <= 2 * PIPE_POOL
    )
    trend = summary["rss_trend"] or {}
    unexpected = {**summary["unexpected"], **summary["open_failed"]}
    closing = ", ".join(f"{k}: {v:,}" for k, v in sorted(summary["closing_answers"].items()))
    lines = [
        ["metric", "value", "goal", "result"],
        ["sessions opened (small + bulk)",
         f"{summary['sessions_opened']:,} of {summary['sessions_wanted']:,}", "all", ""],
        ["small messages sent", f"{summary['messages_sent']:,}", "", ""],
        ["small messages verified (echo byte for byte)",
         f"{summary['messages_verified']:,}", "= sent", met(summary["messages_lost"] == 0)],
        ["bulk bytes sent / verified",
         f"{summary['bulk_bytes_sent']:,} / {summary['bulk_bytes_verified']:,}",
         "= sent", met(summary["bulk_bytes_sent"] == summary["bulk_bytes_verified"])],
        ["nothing lost", "", "", met(checks[0])],
        ["unexpected closes (by code or cause)",
         ", ".join(f"{k}: {v}" for k, v in sorted(unexpected.items())) or "0", "0", ""],
        ["bridge's answers to our close frames", closing or "-",
         f"close 1000: {summary['sessions_wanted']:,}", ""],
        ["no unexpected close", "", "", met(checks[1])],
        ["the bridge's pings answered (--heartbeat)", f"{summary['pongs']:,}", "", ""],
        ["small-message round trip p50 / p99 / max (us)",
         f"{fmt(summary['rtt_p50_us'])} / {fmt(summary['rtt_p99_us'])} / "
         f"{fmt(summary['rtt_max_us'])}", "", ""],
        ["bridge RSS before opening / peak (MiB)",
         f"{summary['rss_before_mib']:.1f} / {summary['rss_peak_mib']:.1f}", "", ""],
        [f"bridge RSS at t={fmt(trend.get('from_t'))} s / t={fmt(trend.get('to_t'))} s (MiB)",
         f"{fmt(trend.get('rss_start_mib'), '.2f')} / {fmt(trend.get('rss_end_mib'), '.2f')}",
         "", ""],
        [f"RSS changes of {STEP_MIB:g} MiB or more between two samples after warm-up",
         _steps(trend.get("steps", [])), "", ""],
        ["RSS slope after warm-up (MiB/min, least squares)",
         fmt(trend.get("slope_mib_per_min"), "+.3f"), "", ""],
        ["RSS growth per 10 min after warm-up (slope; endpoints)",
         f"{fmt(trend.get('growth_pct_per_10min'), '+.2f')}%; "
         f"{fmt(trend.get('endpoint_pct_per_10min'), '+.2f')}%",
         f"< {RSS_GOAL:g}%", met(checks[2])],
        ["bridge fds before / max / after close",
         f"{summary['fds_before']} / {summary['fds_max']} / {summary['fds_after_close']}", "", ""],
        ["bridge sockets before / after close; pipes after close",
         f"{summary['sockets_before']} / {summary['sockets_after_close']}; "
         f"{summary['pipes_after_close']}",
         f"same; <= {2 * PIPE_POOL} (its pipe pool)", "ok" if fds_ok else "(!)"],
        ["bridge CPU time (s)", fmt(summary["bridge_cpu_s"], ".1f"), "", ""],
        ["bridge log: warnings/errors", str(summary["log"]["problem_lines"]), "0", ""],
        ["overall", "", "", met(summary["passed"])],
    ]  # fmt: skip
    if summary["bridge_gone"]:
        lines.insert(-1, ["bridge process", summary["bridge_gone"], "alive", "FAIL"])
    return _table(lines, markdown)


def describe(opts: SoakOptions) -> str:
    rate = f"{opts.bulk_rate:g} MiB/s each way" if opts.bulk_rate else "unpaced"
    return (
        f"{opts.sessions:,} small sessions (one {MIN_SIZE}-{MAX_SIZE} B message every "
        f"{opts.interval:g} s +-50% each) and {opts.bulk} bulk echo sessions ({rate}) "
        f"for {opts.minutes:g} min; warm-up {opts.warmup:g} s"
    )


def run(opts: SoakOptions, command: str, commit: str) -> dict[str, Any]:
    hard = raise_fd_limit()
    need = 2 * (opts.sessions + opts.bulk) + FD_RESERVE
    if hard < need:
        raise SystemExit(f"soak: RLIMIT_NOFILE hard limit {hard} < {need} descriptors needed")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / f"soak-{stamp}"
    max_conn = str(opts.max_connections)

    def bridge_argv(port: int, target_port: int) -> list[str]:
        exe = BRIDGE_SPEC.argv(port, target_port)[0]
        extra = list(opts.bridge_args)
        return [exe, "--max-connections", max_conn, *extra, str(port), f"127.0.0.1:{target_port}"]

    spec = ProxySpec("trio-bridge", bridge_argv, package="trio_bridge")
    _log(f"soak: {describe(opts)}")
    started = time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    with (
        frozen_source("trio_bridge") as source,
        TargetProcess() as target,
        RunningProxy(spec, target.port, log_dir / "bridge.log", source_root=source) as bridge,
    ):
        argv = bridge_argv(bridge.port, target.port)
        _log(f"soak: bridge pid {bridge.pid}: {' '.join(argv)}")
        soak = Soak(opts, bridge.port, bridge.pid, target.pid)
        budget = OPEN_TIMEOUT * (opts.sessions / OPEN_CONCURRENCY + 2) + opts.seconds + 120
        trio.run(_bounded, soak, budget)
    log = scan_log(log_dir / "bridge.log")  # complete: the bridge has exited
    summary = summarise(soak, log)
    document = {
        "meta": {
            "date": date,
            "command": command,
            "elapsed_seconds": round(time.monotonic() - started),
            "options": vars(opts) | {"warmup": opts.warmup},
            "bridge_argv": ["trio-bridge", *argv[1:]],
            "machine": machine(),
            "commit": commit,
            "clock_ticks": CLOCK_TICKS,
            "log": str(log_dir.relative_to(ROOT)),
        },
        "summary": summary,
        "samples": soak.samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / f"soak-{stamp}.json"
    saved.write_text(json.dumps(document, indent=2) + "\n")
    _log(f"raw results in {saved.relative_to(ROOT)}")
    return document


async def _bounded(soak: Soak, budget: float) -> None:
    with trio.move_on_after(budget) as scope:
        await soak.run()
    if scope.cancelled_caught:
        soak.tally.note("soak stopped at its time budget", f"{budget:.0f} s", soak.t())


def print_report(document: dict[str, Any], markdown: bool = False) -> None:
    meta, summary = document["meta"], document["summary"]
    o = meta["options"]
    opts = SoakOptions(**{k: v for k, v in o.items() if k != "warmup"})
    print()
    print(f"Soak of {meta['date']}: `{meta['command']}` ({meta['elapsed_seconds']} s), "
          f"trio-bridge at {meta['commit']}")  # fmt: skip
    m = meta["machine"]
    print(f"Machine: {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}")
    print(f"Load: {describe(opts)}")
    print(f"Bridge: {' '.join(meta['bridge_argv'])}")
    print()
    print(series_table(document["samples"], markdown=markdown))
    print()
    print(summary_table(summary, opts, markdown))
    for example in summary["unexpected_examples"]:
        print(f"  unexpected: {example}")
    for line in summary["log"]["first_problems"]:
        print(f"  bridge log: {line}")
    ends = summary["log"]["session_ends"]
    if ends:
        print("  bridge's session-end lines: " + "; ".join(f"{v:,}x {k}" for k, v in ends.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("soak (--soak; nothing else is run)")
    group.add_argument(
        "--soak",
        action="store_true",
        help="run the soak instead of the comparison: many sessions through one trio-bridge "
        "for minutes, every echo checked, the bridge's RSS and descriptors sampled",
    )
    d = SoakOptions()
    options = [
        ("--soak-sessions", int, d.sessions, "N", "small-message sessions"),
        ("--soak-minutes", float, d.minutes, "M", "duration once all are open"),
        ("--soak-bulk", int, d.bulk, "K", "bulk echo sessions alongside"),
        ("--soak-interval", float, d.interval, "S", "mean seconds between a session's messages"),
        ("--soak-bulk-rate", float, d.bulk_rate, "MIB_S", "per bulk session, each way; 0: unpaced"),
    ]
    for flag, kind, default, metavar, text in options:
        group.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} ({default:g})"
        )
    group.add_argument(
        "--soak-bridge-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the bridge, e.g. --soak-bridge-arg=--heartbeat=0 (repeatable)",
    )
    group.add_argument(
        "--soak-markdown",
        action="store_true",
        help="print the tables as Markdown (with --from-json PATH: a saved soak, no new run)",
    )


def main(args: argparse.Namespace, argv: list[str] | None, commit: str) -> int:
    opts = SoakOptions(
        sessions=args.soak_sessions,
        minutes=args.soak_minutes,
        bulk=args.soak_bulk,
        interval=args.soak_interval,
        bulk_rate=args.soak_bulk_rate,
        bridge_args=tuple(args.soak_bridge_arg),
    )
    # What ./dev bench runs after its set-up, too.
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    if args.from_json:
        document = json.loads(Path(args.from_json).read_text())
        # The trend again, as this version computes it (e.g. its steps).
        warmup = document["meta"]["options"]["warmup"]
        document["summary"]["rss_trend"] = rss_trend(document["samples"], warmup)
    else:
        document = run(opts, command, commit)
    print_report(document, args.soak_markdown)
    return 0 if document["summary"]["passed"] else 1
