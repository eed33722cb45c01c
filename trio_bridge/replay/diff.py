"""The shortest edit between two sequences of keys, as ``difflib`` opcodes.

Recorded sessions are repetitive: a VNC client sends the same update request and
pointer events thousands of times. ``difflib.SequenceMatcher`` then takes quadratic
time (26 s for 20,000 messages with two edits) and may align the repeats poorly. This
is Myers' O((N+M)D) algorithm ("An O(ND) Difference Algorithm and Its Variations",
1986), which is fast when the sequences differ in few places (D small), whatever they
repeat. The common head and tail are cut off first; a small middle goes to
SequenceMatcher (it pairs a changed message with its original as a replace, where a
shortest edit may insert here and delete there); a large one to Myers, and past
``max_edits`` edits to SequenceMatcher when not too long, else it is one replaced block.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from difflib import SequenceMatcher

Opcode = tuple[str, int, int, int, int]  # tag, a1, a2, b1, b2 as difflib gives them

MAX_EDITS = 200
SMALL = 1000 * 1000  # middles up to this many pairs go to SequenceMatcher
MAX_FALLBACK = 5000  # longest middle handed to SequenceMatcher past MAX_EDITS


def opcodes(
    a: Sequence[Hashable],
    b: Sequence[Hashable],
    max_edits: int = MAX_EDITS,
    small: int = SMALL,
) -> list[Opcode]:
    """``difflib.SequenceMatcher(None, a, b).get_opcodes()``, in the sense of a
    shortest edit script."""
    head = 0
    while head < len(a) and head < len(b) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < len(a) - head and tail < len(b) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    middle_a, middle_b = a[head : len(a) - tail], b[head : len(b) - tail]
    middle = _middle(middle_a, middle_b, max_edits, small)
    shifted = [(tag, a1 + head, a2 + head, b1 + head, b2 + head) for tag, a1, a2, b1, b2 in middle]
    result: list[Opcode] = []
    if head:
        result.append(("equal", 0, head, 0, head))
    result += shifted
    if tail:
        result.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    return _merged(result)


def _middle(
    a: Sequence[Hashable], b: Sequence[Hashable], max_edits: int, small: int
) -> list[Opcode]:
    if not a and not b:
        return []
    # Small integers compare faster than payloads: number the distinct keys.
    numbers: dict[Hashable, int] = {}
    x = [numbers.setdefault(key, len(numbers)) for key in a]
    y = [numbers.setdefault(key, len(numbers)) for key in b]
    if len(x) * len(y) <= small:
        # Quick at this size, and it pairs what a person would: where a message changed,
        # a replace, not an insertion here and a deletion there.
        return list(SequenceMatcher(None, x, y, False).get_opcodes())
    trace = _forward(x, y, max_edits)
    if trace is not None:
        return _grouped(_backward(trace, len(x), len(y)))
    if len(a) + len(b) <= MAX_FALLBACK:
        return list(SequenceMatcher(None, x, y, False).get_opcodes())
    return [("replace", 0, len(a), 0, len(b))]


def _forward(a: list[int], b: list[int], max_edits: int) -> list[dict[int, int]] | None:
    """Myers' greedy forward search; the furthest x on each diagonal k = x - y before
    each edit count d (None: more than ``max_edits`` edits)."""
    n, m = len(a), len(b)
    v = {1: 0}
    trace = []
    for d in range(max_edits + 1):
        trace.append(dict(v))
        for k in range(-d, d + 1, 2):
            down = k == -d or (k != d and v[k - 1] < v[k + 1])  # down: an insertion
            x = v[k + 1] if down else v[k - 1] + 1  # else right: a deletion
            y = x - k
            while x < n and y < m and a[x] == b[y]:
                x, y = x + 1, y + 1
            v[k] = x
            if x >= n and y >= m:
                return trace
    return None


def _backward(trace: list[dict[int, int]], n: int, m: int) -> list[tuple[str, int, int]]:
    """The edits, first to last: ("equal", i, j), ("delete", i, -1), ("insert", -1, j)."""
    edits = []
    x, y = n, m
    for d in range(len(trace) - 1, -1, -1):
        v = trace[d]
        k = x - y
        down = k == -d or (k != d and v.get(k - 1, -1) < v.get(k + 1, -1))
        previous_k = k + 1 if down else k - 1
        previous_x = v[previous_k]
        previous_y = previous_x - previous_k
        while x > previous_x and y > previous_y:
            x, y = x - 1, y - 1
            edits.append(("equal", x, y))
        if d:
            if x == previous_x:
                edits.append(("insert", -1, y - 1))
            else:
                edits.append(("delete", x - 1, -1))
        x, y = previous_x, previous_y
    edits.reverse()
    return edits


def _grouped(edits: list[tuple[str, int, int]]) -> list[Opcode]:
    """Runs of equal elements, and between them one block of deletions and insertions
    (a replace when it has both), as difflib reports them."""
    result: list[Opcode] = []
    i = j = 0
    for kind, x, y in edits:
        if kind == "equal":
            if (i, j) != (x, y):
                result.append(_change(i, x, j, y))
            result.append(("equal", x, x + 1, y, y + 1))
            i, j = x + 1, y + 1
    end_a = max([x + 1 for kind, x, _ in edits if kind != "insert"] + [i])
    end_b = max([y + 1 for kind, _, y in edits if kind != "delete"] + [j])
    if (i, j) != (end_a, end_b):
        result.append(_change(i, end_a, j, end_b))
    return _merged(result)


def _change(a1: int, a2: int, b1: int, b2: int) -> Opcode:
    tag = "replace" if a2 > a1 and b2 > b1 else "delete" if a2 > a1 else "insert"
    return tag, a1, a2, b1, b2


def _merged(codes: list[Opcode]) -> list[Opcode]:
    """Adjacent equal runs as one."""
    merged: list[Opcode] = []
    for code in codes:
        if merged and code[0] == "equal" == merged[-1][0]:
            tag, a1, _, b1, _ = merged[-1]
            merged[-1] = (tag, a1, code[2], b1, code[4])
        else:
            merged.append(code)
    return merged
