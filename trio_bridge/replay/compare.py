"""Comparing a live side with a recording: diff-style alignment and comparator plug-ins.

``drive`` and ``serve`` never compare at positions or stream offsets: one inserted,
missing or re-cut message would make everything after it "differ". They align the two
sequences of messages as diff(1) aligns lines (a shortest edit script over message
keys, replay/diff.py), then report each block that does not match once:

- a *replaced* block whose bytes, joined, are the same on both sides was only cut
  differently (TCP reads, a bridge's frames): not a divergence;
- otherwise one :class:`Divergence`, with the time, the direction, the record's offset
  in the file, and a hexdump of both sides from their first differing byte.

A comparator is anything with the :class:`Comparator` methods (a ``typing.Protocol``:
no base class to inherit). ``drive`` feeds it the recorded client's messages (which it
may rewrite before they are sent), the recorded server's messages and the live
server's, asks it whether the live side has caught up (for pacing), and finally for
its findings. Built in: ``bytes``, ``messages``, ``lengths``, ``none`` (here) and
``rfb`` (replay/rfb.py). docs/replay.md describes the interface.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .diff import opcodes
from .messages import Message
from .preview import describe_payload, hexdump

CONTEXT = 32  # bytes of hexdump per side and divergence
MAX_FINDINGS = 20
RESYNC_LOOKAHEAD = 8  # recorded messages tried after a mismatch (bytes mode)
RESYNC_WINDOW = 1 << 20  # bytes of the live stream searched for them
TAIL_MESSAGES = 4  # live messages searched for the latest recorded one (pacing)
MIN_ANCHOR = 4  # a recorded message shorter than this is too common to resynchronise on


@dataclass(frozen=True)
class Finding:
    """One thing a comparator reports: a heading and the lines under it."""

    heading: str
    body: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return [self.heading, *self.body]


class Comparator(Protocol):
    """What ``drive`` needs from a comparator (docs/replay.md, "Comparators")."""

    name: str

    def client_sends(self, payload: bytes) -> bytes:
        """A recorded client message about to be sent: returns the bytes to send
        (the same, or rewritten, e.g. RFB's SetEncodings)."""
        ...

    def expect(self, message: Message) -> None:
        """The recorded server sent ``message`` (in order, as the replay reaches it)."""
        ...

    def receive(self, message: Message) -> None:
        """The live server sent ``message`` (a TCP read, or a WebSocket message)."""
        ...

    def caught_up(self) -> bool:
        """Whether the live server has sent what the recorded one had sent so far."""
        ...

    def sync(self) -> None:
        """A sync point: the live server caught up before a client message; a comparator
        of states (screens) compares them here (and once more in ``findings``)."""
        ...

    def findings(self) -> list[Finding]:
        """At the end: what differs (empty: the same)."""
        ...


@dataclass(frozen=True)
class Divergence:
    """A block of messages that differs between the recording and the live side."""

    direction: str  # "target->client" or "client->target"
    index: int  # 1-based number of the first recorded message of the block
    byte: int  # stream offset of the first differing byte (recorded side)
    expected: bytes  # from the first differing byte, at most CONTEXT
    got: bytes
    expected_count: int  # messages in the block, each side
    got_count: int
    recorded_at_us: int = -1  # -1: nothing recorded here (extra messages)
    record_offset: int = -1
    received_at: float = -1.0  # seconds since the live session started
    expected_first: str = ""  # the first message of the block, each side, in one line
    got_first: str = ""

    @property
    def kind(self) -> str:
        if not self.got_count:
            return "missing"
        return "extra" if not self.expected_count else "different"

    def lines(self) -> list[str]:
        where = [f"{self.direction} message #{self.index}, byte {self.byte}"]
        if self.recorded_at_us >= 0:
            where.append(f"recorded at {self.recorded_at_us / 1e6:.3f} s")
        if self.record_offset >= 0:
            where.append(f"record at file offset {self.record_offset}")
        if self.received_at >= 0:
            where.append(f"received at {self.received_at:.3f} s")
        counts = f"{self.expected_count} recorded, {self.got_count} received"
        lines = [f"@@ {', '.join(where)}: {self.kind} ({counts}) @@"]
        if self.expected_first:
            lines.append(f"  recorded {self.expected_first}")
        if self.got_first:
            lines.append(f"  received {self.got_first}")
        lines += hexdump(self.expected, self.byte, "- ") if self.expected else ["- (nothing)"]
        lines += hexdump(self.got, self.byte, "+ ") if self.got else ["+ (nothing)"]
        return lines

    def finding(self) -> Finding:
        heading, *body = self.lines()
        return Finding(heading, tuple(body))


def _offsets(messages: Sequence[Message]) -> list[int]:
    """Stream offset of each message's first byte, and the total at the end."""
    offsets, total = [], 0
    for message in messages:
        offsets.append(total)
        total += len(message.payload)
    offsets.append(total)
    return offsets


def align(
    expected: Sequence[Message],
    got: Sequence[Message],
    key: Callable[[Message], Hashable],
    direction: str,
    *,
    joined_equal_is_same: bool = True,
) -> tuple[int, list[Divergence]]:
    """Align ``got`` with ``expected`` by ``key``; (messages matched, divergences)."""
    codes = opcodes([key(m) for m in expected], [key(m) for m in got])
    starts = _offsets(expected)
    matched, divergences = 0, []
    for tag, e1, e2, g1, g2 in codes:
        if tag == "equal":
            matched += e2 - e1
            continue
        ours, theirs = expected[e1:e2], got[g1:g2]
        a = b"".join(m.payload for m in ours)
        b = b"".join(m.payload for m in theirs)
        if joined_equal_is_same and ours and theirs and a == b:
            matched += e2 - e1  # the same bytes, cut differently
            continue
        divergences.append(_divergence(direction, expected, starts, e1, ours, theirs, a, b))
    return matched, divergences


def _divergence(
    direction: str,
    expected: Sequence[Message],
    starts: list[int],
    e1: int,
    ours: Sequence[Message],
    theirs: Sequence[Message],
    a: bytes,
    b: bytes,
) -> Divergence:
    first = _common_prefix(a, b)
    # The recorded message that holds the first differing byte (or the block's first).
    index = e1
    while index + 1 < e1 + len(ours) and starts[index + 1] - starts[e1] <= first:
        index += 1
    anchor = expected[index] if ours else None
    number = anchor.index if anchor is not None else (expected[e1 - 1].index + 1 if e1 else 1)
    return Divergence(
        direction=direction,
        index=number,
        byte=starts[e1] + first,
        expected=a[first : first + CONTEXT],
        got=b[first : first + CONTEXT],
        expected_count=len(ours),
        got_count=len(theirs),
        recorded_at_us=anchor.time_us if anchor is not None else -1,
        record_offset=anchor.offset if anchor is not None else -1,
        received_at=theirs[0].time_us / 1e6 if theirs else -1.0,
        expected_first=_first(ours),
        got_first=_first(theirs),
    )


def _first(messages: Sequence[Message]) -> str:
    if not messages:
        return ""
    more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    return describe_payload(messages[0].payload, text=messages[0].text) + more


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def resplit(
    expected: Sequence[Message], stream: bytes, times: Sequence[tuple[int, int]]
) -> list[Message]:
    """Cut a live byte stream where the recorded messages are cut, as far as the bytes
    agree: a recorded message found at the current position is one piece; after a
    mismatch, the earliest of the next few recorded messages found further on starts the
    next piece (what lies between is one piece); when none is found, a piece as long as
    the recorded message (a substitution). ``times`` maps stream offsets to receive
    times: (offset of a read, µs) in order.
    """
    pieces: list[bytes] = []
    position, i = 0, 0
    while position < len(stream):
        if (
            i < len(expected)
            and expected[i].payload
            and stream.startswith(expected[i].payload, position)
        ):
            pieces.append(expected[i].payload)
            position += len(expected[i].payload)
            i += 1
            continue
        found, skip = _resync(expected, i, stream, position)
        if found > position:
            pieces.append(stream[position:found])
            position = found
            i = skip
            continue
        size = len(expected[i].payload) if i < len(expected) else len(stream) - position
        pieces.append(stream[position : position + max(size, 1)])
        position += max(size, 1)
        i += 1
    return _stamped(pieces, times)


def _resync(expected: Sequence[Message], i: int, stream: bytes, position: int) -> tuple[int, int]:
    """(where, which): the earliest of the next recorded messages found after ``position``."""
    best, which = -1, i
    for j in range(i, min(i + RESYNC_LOOKAHEAD, len(expected))):
        payload = expected[j].payload
        if len(payload) < MIN_ANCHOR:
            continue
        end = position + RESYNC_WINDOW if best < 0 else best
        found = stream.find(payload, position + 1, end + len(payload))
        if found >= 0 and (best < 0 or found < best):
            best, which = found, j
    return best, which


def _stamped(pieces: list[bytes], times: Sequence[tuple[int, int]]) -> list[Message]:
    messages, offset, t = [], 0, 0
    for number, piece in enumerate(pieces, 1):
        while t + 1 < len(times) and times[t + 1][0] <= offset:
            t += 1
        at = times[t][1] if times else 0
        messages.append(Message(number, False, piece, at, offset))
        offset += len(piece)
    return messages


# -- the stream comparators ---------------------------------------------------------------------


@dataclass
class StreamComparator:
    """``bytes``: the live stream, re-cut at the recording's message boundaries where it
    agrees, aligned message by message (how the server's bytes were cut is ignored).
    ``messages``: messages as they came (a re-cut message differs); ``lengths``: only
    their sizes; ``none``: nothing compared (pacing and the close still are).

    All pace by bytes: caught up when the live server sent as many bytes as the recorded
    one had. Divergences are about the target->client direction.
    """

    mode: str = "bytes"  # one of STREAM_MODES
    name: str = ""  # shown in the report (default: the mode)
    expected: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    expected_bytes: int = 0
    received_bytes: int = 0
    matched: int = 0  # recorded messages matched (set by findings())
    found: list[Divergence] = field(default_factory=list)  # (set by findings())

    def __post_init__(self) -> None:
        if self.mode not in STREAM_MODES:
            raise ValueError(f"mode must be one of {', '.join(STREAM_MODES)}")
        self.name = self.name or self.mode

    def client_sends(self, payload: bytes) -> bytes:
        return payload

    def expect(self, message: Message) -> None:
        if self.mode != "none":
            self.expected.append(message)
        self.expected_bytes += len(message.payload)

    def receive(self, message: Message) -> None:
        if self.mode != "none":
            self.received.append(message)
        self.received_bytes += len(message.payload)

    def caught_up(self) -> bool:
        """As many bytes as recorded, or (after a change of length) the latest recorded
        message is at the end of what came."""
        if self.received_bytes >= self.expected_bytes:
            return True
        if not self.expected or not self.received or self.mode == "none":
            return False
        last = self.expected[-1].payload
        if len(last) < MIN_ANCHOR:
            return False
        tail = b"".join(m.payload for m in self.received[-TAIL_MESSAGES:])
        return tail.endswith(last)

    def sync(self) -> None:
        pass  # compared at the end, aligned

    def findings(self) -> list[Finding]:
        self.found = divergences = self.divergences()
        found = [d.finding() for d in divergences[:MAX_FINDINGS]]
        if len(divergences) > MAX_FINDINGS:
            found.append(Finding(f"... and {len(divergences) - MAX_FINDINGS} more divergences"))
        return found

    def divergences(self) -> list[Divergence]:
        direction = "target->client"
        if self.mode == "none":
            return []
        if self.mode == "bytes":
            stream = b"".join(m.payload for m in self.received)
            times = [(m.offset, m.time_us) for m in self.received]
            live = resplit(self.expected, stream, times)
            self.matched, found = align(self.expected, live, _payload, direction)
        elif self.mode == "messages":
            self.matched, found = align(
                self.expected, self.received, message_key, direction, joined_equal_is_same=False
            )
        else:
            self.matched, found = align(
                self.expected, self.received, _length, direction, joined_equal_is_same=False
            )
        return found


def _payload(message: Message) -> Hashable:
    return message.payload


def message_key(message: Message) -> Hashable:
    return message.text, message.payload


def _length(message: Message) -> Hashable:
    return len(message.payload)


STREAM_MODES = ("bytes", "messages", "lengths", "none")
