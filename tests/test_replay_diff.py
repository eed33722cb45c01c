"""replay/diff.py: the alignment drive and serve report divergences with."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from trio_bridge.replay.diff import Opcode, opcodes


def check(a: Sequence[str], b: Sequence[str], codes: list[Opcode]) -> int:
    """The opcodes turn ``a`` into ``b``, contiguous, equal where they say; the number
    of elements kept."""
    rebuilt: list[str] = []
    at_a = at_b = 0
    for tag, a1, a2, b1, b2 in codes:
        assert (a1, b1) == (at_a, at_b), codes
        if tag == "equal":
            assert a[a1:a2] == b[b1:b2]
        rebuilt += b[b1:b2]
        at_a, at_b = a2, b2
    assert (at_a, at_b) == (len(a), len(b)) and rebuilt == list(b)
    return sum(a2 - a1 for tag, a1, a2, _, _ in codes if tag == "equal")


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    lengths = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            same = lengths[i + 1][j + 1] + 1 if a[i] == b[j] else 0
            lengths[i][j] = max(same, lengths[i + 1][j], lengths[i][j + 1])
    return lengths[0][0]


def test_a_shortest_edit_on_random_sequences() -> None:
    """Myers' path keeps as many elements as can be kept; the default (SequenceMatcher
    for small middles, which pairs changes as a person would) is a valid edit script."""
    rng = random.Random(14)
    for _ in range(2000):
        a = rng.choices("ABC", k=rng.randint(0, 12))
        b = rng.choices("ABC", k=rng.randint(0, 12))
        myers = opcodes(a, b, small=0)
        assert check(a, b, myers) == longest_common_subsequence(a, b), (a, b)
        check(a, b, opcodes(a, b))


def test_a_changed_message_is_one_replace() -> None:
    recorded = ["RFB 003.008", "RFB 003.008", "hello"]
    live = ["RFB 003.007", "RFB 003.008", "hello"]
    assert opcodes(recorded, live) == [("replace", 0, 1, 0, 1), ("equal", 1, 3, 1, 3)]


def test_repetitive_sessions_align_fast_and_whole() -> None:
    """A VNC client's messages: two kinds, alternating, 20,000 of them, one extra and one
    missing. difflib.SequenceMatcher took 27 s here and kept half of them."""
    recorded = ["update request" if i % 2 else "pointer" for i in range(20_000)]
    live = list(recorded)
    del live[10_000]
    live.insert(6_666, "key")
    started = time.perf_counter()
    codes = opcodes(recorded, live)
    assert time.perf_counter() - started < 5  # ~0.01 s
    assert check(recorded, live, codes) == 19_999
    assert [code for code in codes if code[0] != "equal"] == [
        ("insert", 6_666, 6_666, 6_666, 6_667),
        ("delete", 10_000, 10_001, 10_001, 10_001),
    ]


def test_sequences_with_nothing_in_common_are_one_replaced_block() -> None:
    a, b = [str(i) for i in range(4000)], [f"x{i}" for i in range(4000)]
    assert opcodes(a, b) == [("replace", 0, 4000, 0, 4000)]
