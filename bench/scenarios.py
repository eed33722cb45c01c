"""Measurements over one WebSocket session: bulk throughput each way and round trips.

Each scenario opens a fresh session, then brackets only the data transfer with CPU
snapshots of the proxy tree (and of the client and target, to show they kept up).
The session is open and idle at both snapshots, so no websockify handler is being
forked or reaped while its tree is read (see :mod:`bench.procstat`), and the
handshake's cost stays out of the per-byte figures for both proxies alike.

Totals are exact rather than estimated from buffers: downstream, the client asks the
target for the bytes it will read, a batch ahead; upstream, the target acknowledges
every ``ack_every`` bytes and the client sends a whole number of those.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench import wire
from bench.procstat import (
    machine_busy_seconds,
    own_cpu_seconds,
    softirq_thread_seconds,
    tree_cpu_seconds,
)
from bench.wsclient import FrameReader, SessionFailed, binary_frame, open_session

IO_TIMEOUT = 30.0  # no single send or receive may stall longer than this
DOWN_BATCH = 16 << 20
UP_FRAME = 64 << 10  # payload per upstream frame, a typical large client message
UP_FRAMES_PER_SEND = 16
UP_ACK_EVERY = 16 << 20
RT_SIZE = 64
RT_VARIANTS = 64  # distinct pre-masked messages, cycled
RT_WARMUP = 200
GIB = 1 << 30
MIB = 1 << 20


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Window:
    """Wall time and CPU seconds of each party over one measured interval."""

    seconds: float
    proxy_cpu: float
    client_cpu: float
    target_cpu: float
    machine_cpu: float  # every process on the machine, these three included
    softirq_cpu: float  # the kernel's deferred network processing (ksoftirqd)

    def busy(self) -> dict[str, float]:
        """Each party's CPU as a share of one core: the proxy near 1.0 while the client
        and target stay well below it means the proxy was the bottleneck."""
        return {
            "proxy": self.proxy_cpu / self.seconds,
            "client": self.client_cpu / self.seconds,
            "target": self.target_cpu / self.seconds,
            "softirq": self.softirq_cpu / self.seconds,
            "others": max(
                0.0,
                self.machine_cpu
                - self.proxy_cpu
                - self.client_cpu
                - self.target_cpu
                - self.softirq_cpu,
            )
            / self.seconds,
        }


class Meter:
    """Takes CPU snapshots of the proxy tree, this client process and the target."""

    def __init__(self, proxy_pid: int, target_pid: int) -> None:
        self.proxy_pid = proxy_pid
        self.target_pid = target_pid
        self._start: tuple[float, ...] = ()

    def _sample(self) -> tuple[float, ...]:
        return (
            time.perf_counter(),
            tree_cpu_seconds(self.proxy_pid),
            _client_cpu(),
            own_cpu_seconds(self.target_pid),
            machine_busy_seconds(),
            softirq_thread_seconds(),
        )

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> Window:
        end = self._sample()
        return Window(*(b - a for a, b in zip(self._start, end, strict=True)))


@dataclass
class Bulk:
    direction: str
    bytes: int
    frames: int  # data frames the client received downstream / sent upstream
    window: Window
    recorded_bytes: int | None = None  # size of the session's recording (--record runs)

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MIB / self.window.seconds

    @property
    def cpu_s_per_gib(self) -> float:
        return self.window.proxy_cpu / (self.bytes / GIB)

    def as_dict(self) -> dict[str, Any]:
        out = {
            **asdict(self),
            "mib_per_s": self.mib_per_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "busy": self.window.busy(),
        }
        if self.recorded_bytes is not None:
            # Recording file / relayed payload: ~1.0 (22-byte record headers add a little),
            # lower when the recorder dropped frames because the disk fell behind.
            out["recorded_share"] = self.recorded_bytes / self.bytes
        return out


@dataclass
class RoundTrips:
    count: int
    p50_us: float
    p99_us: float
    mean_us: float
    window: Window

    @property
    def cpu_us_per_rt(self) -> float:
        return self.window.proxy_cpu / self.count * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_us_per_rt": self.cpu_us_per_rt, "busy": self.window.busy()}


def downstream(port: int, meter: Meter, duration: float) -> Bulk:
    """Target -> client for about ``duration`` seconds; exact byte count."""
    with contextlib.closing(open_session(port, IO_TIMEOUT)) as sock:
        reader = FrameReader(sock, discard=True)
        meter.start()
        deadline = time.perf_counter() + duration
        requested = 2 * DOWN_BATCH
        sock.sendall(binary_frame(wire.down_start(requested)))
        received = 0
        while received < requested:
            received += reader.skip_frame()
            if requested - received <= DOWN_BATCH and time.perf_counter() < deadline:
                sock.sendall(binary_frame(wire.down_more(DOWN_BATCH)))
                requested += DOWN_BATCH
        window = meter.stop()
    if received != requested:
        raise SessionFailed(f"downstream: asked for {requested} bytes, got {received}")
    return Bulk("downstream", received, reader.frames, window)


def upstream(port: int, meter: Meter, duration: float) -> Bulk:
    """Client -> target for about ``duration`` seconds, until the target acknowledges all."""
    payload = os.urandom(UP_FRAME)
    chunk = b"".join(binary_frame(payload) for _ in range(UP_FRAMES_PER_SEND))
    chunk_payload = UP_FRAME * UP_FRAMES_PER_SEND
    assert UP_ACK_EVERY % chunk_payload == 0
    with contextlib.closing(open_session(port, IO_TIMEOUT)) as sock:
        reader = FrameReader(sock)
        sock.sendall(binary_frame(wire.up_start(UP_ACK_EVERY)))
        meter.start()
        deadline = time.perf_counter() + duration
        sent = 0
        while time.perf_counter() < deadline or sent % UP_ACK_EVERY:
            sock.sendall(chunk)
            sent += chunk_payload
        acks = 0
        while acks < sent // UP_ACK_EVERY:
            acks += len(reader.payload())
        window = meter.stop()
    return Bulk("upstream", sent, sent // UP_FRAME, window)


def round_trips(port: int, meter: Meter, count: int, max_seconds: float) -> RoundTrips:
    """``count`` 64-byte messages echoed by the target, one at a time."""
    payloads = [os.urandom(RT_SIZE) for _ in range(RT_VARIANTS)]
    frames = [binary_frame(p) for p in payloads]
    latencies = np.zeros(count, dtype=np.int64)
    with contextlib.closing(open_session(port, IO_TIMEOUT)) as sock:
        reader = FrameReader(sock, size=64 << 10)
        sock.sendall(binary_frame(wire.echo_start()))

        def one(i: int) -> int:
            expected = payloads[i % RT_VARIANTS]
            start = time.perf_counter_ns()
            sock.sendall(frames[i % RT_VARIANTS])
            got = reader.payload()
            while len(got) < RT_SIZE:  # a proxy may split a message across frames
                got += reader.payload()
            elapsed = time.perf_counter_ns() - start
            if got != expected:
                raise SessionFailed("round trip: the echo differs from the message sent")
            return elapsed

        for i in range(RT_WARMUP):
            one(i)
        meter.start()
        deadline = time.perf_counter() + max_seconds
        done = 0
        while done < count and time.perf_counter() < deadline:
            latencies[done] = one(done)
            done += 1
        window = meter.stop()
    sample = latencies[:done] / 1000
    return RoundTrips(
        count=done,
        p50_us=float(np.percentile(sample, 50)),
        p99_us=float(np.percentile(sample, 99)),
        mean_us=float(sample.mean()),
        window=window,
    )
