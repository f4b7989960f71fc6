"""PrefixIndex against a brute-force model, with small alphabets so prefixes collide often."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from erllama.cache.index import PrefixIndex
from erllama.cache.key import encode_tokens

from ..helpers import common_prefix_len, examples

NS_IDS = st.sampled_from([b"ns-a", b"ns-b"])
TOKENS = st.lists(st.integers(0, 2), max_size=8).map(tuple)
# Few keys: the same key under different tokens (or namespaces) must be handled too.
KEYS = st.sampled_from([bytes([i]) * 32 for i in range(4)])
Row = tuple[bytes, tuple[int, ...], bytes]


def reference(
    rows: set[Row], ns: bytes, tokens: tuple[int, ...], max_len: int | None
) -> list[tuple[int, bytes]]:
    limit = len(tokens) if max_len is None else max_len
    return sorted(
        (len(t), k) for n, t, k in rows if n == ns and len(t) <= limit and tokens[: len(t)] == t
    )


class IndexMachine(RuleBasedStateMachine):
    rows = Bundle("rows")

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex()
        self.model: set[Row] = set()

    @rule(target=rows, ns=NS_IDS, tokens=TOKENS, key=KEYS, as_bytes=st.booleans())
    def insert(self, ns: bytes, tokens: tuple[int, ...], key: bytes, as_bytes: bool) -> Row:
        row = (ns, tokens, key)
        given = encode_tokens(tokens) if as_bytes else tokens
        assert self.index.insert(ns, given, key) == (row not in self.model)
        self.model.add(row)
        return row

    @rule(row=rows)
    def remove_known(self, row: Row) -> None:
        assert self.index.remove(*row) == (row in self.model)
        self.model.discard(row)

    @rule(ns=NS_IDS, tokens=TOKENS, key=KEYS)
    def remove_any(self, ns: bytes, tokens: tuple[int, ...], key: bytes) -> None:
        row = (ns, tokens, key)
        assert self.index.remove(ns, tokens, key) == (row in self.model)
        self.model.discard(row)

    @rule(
        ns=NS_IDS,
        tokens=st.lists(st.integers(0, 2), max_size=12).map(tuple),
        max_len=st.none() | st.integers(0, 12),
        longer_than=st.none() | st.integers(0, 12),
        most=st.none() | st.integers(1, 4),
    )
    def longest(
        self,
        ns: bytes,
        tokens: tuple[int, ...],
        max_len: int | None,
        longer_than: int | None,
        most: int | None,
    ) -> None:
        got = self.index.longest(ns, tokens, max_len, longer_than=longer_than, most=most)
        depths = [d for d, _ in got]
        assert depths == sorted(depths, reverse=True), "not deepest first"
        expected = reference(self.model, ns, tokens, max_len)
        if longer_than is not None:
            expected = [(d, k) for d, k in expected if d > longer_than]
        if most is None:
            assert sorted(got) == expected
        else:
            # The ``most`` deepest rows (ties at the cut may resolve either way).
            assert len(got) == min(most, len(expected))
            assert set(got) <= set(expected)
            assert (
                sorted(depths, reverse=True)
                == sorted((d for d, _ in expected), reverse=True)[: len(got)]
            )

    @rule(ns=NS_IDS, tokens=st.lists(st.integers(0, 2), max_size=12).map(tuple))
    def covering(self, ns: bytes, tokens: tuple[int, ...]) -> None:
        # Rows that are not a prefix of the prompt, by the length they share with it.
        others = [
            (common_prefix_len(t, tokens), t, k)
            for n, t, k in self.model
            if n == ns and tokens[: len(t)] != t
        ]
        best = max((c for c, _, _ in others), default=0)
        got = self.index.covering(ns, tokens)
        # A lookup's one walk answers both questions as the separate calls do.
        assert self.index.search(ns, tokens, most=3) == (
            self.index.longest(ns, tokens, most=3),
            got,
        )
        if best == 0:
            assert got is None
            return
        assert got is not None
        common, key, length = got
        assert common == best
        # The key names such a row, of that length; none sharing as much is shorter.
        sharing = [(len(t), k) for c, t, k in others if c == best]
        assert (length, key) in sharing
        assert length == min(n for n, _ in sharing)

    @rule(ns=NS_IDS, tokens=st.lists(st.integers(0, 2), max_size=12).map(tuple))
    def nearest(self, ns: bytes, tokens: tuple[int, ...]) -> None:
        # Any row, prefix or not, by the length it shares with the prompt.
        rows = [(common_prefix_len(t, tokens), t, k) for n, t, k in self.model if n == ns]
        best = max((c for c, _, _ in rows), default=0)
        got = self.index.nearest(ns, tokens)
        if best == 0:
            assert got is None
            return
        assert got is not None
        common, key, length = got
        assert common == best
        assert (length, key) in [(len(t), k) for c, t, k in rows if c == best]
        if any(c == best and len(t) == best for c, t, _ in rows):
            assert length == best, "a prefix row wins a tie"

    @rule()
    def clear(self) -> None:
        self.index.clear()
        self.model.clear()

    @invariant()
    def structure(self) -> None:
        assert len(self.index) == len(self.model)
        self.index._check()


IndexMachine.TestCase.settings = settings(max_examples=examples(2), stateful_step_count=40)
test_index_matches_brute_force = IndexMachine.TestCase


def test_longest_includes_the_whole_prompt_and_shorter_rows_deepest_first() -> None:
    index = PrefixIndex()
    for n in (2, 4, 6):
        index.insert(b"ns", list(range(n)), bytes([n]) * 32)
    index.insert(b"ns", [0, 1, 9], b"x" * 32)
    index.insert(b"other", [0, 1], b"y" * 32)
    assert index.longest(b"ns", range(6)) == [
        (6, b"\x06" * 32),
        (4, b"\x04" * 32),
        (2, b"\x02" * 32),
    ]
    assert index.longest(b"ns", range(6), max_len=5) == [(4, b"\x04" * 32), (2, b"\x02" * 32)]
    assert index.longest(b"missing", range(6)) == []


def test_long_prompts_against_many_rows() -> None:
    index = PrefixIndex()
    base = list(range(1000, 33_000))
    for i in range(1, 200):
        index.insert(b"ns", base[: i * 160], i.to_bytes(32, "little"))
        index.insert(b"ns", [*base[: i * 100], i], (i + 1000).to_bytes(32, "little"))
    got = index.longest(b"ns", base)
    assert [d for d, _ in got] == [i * 160 for i in range(199, 0, -1)]
    index._check()
    for i in range(1, 200):
        assert index.remove(b"ns", base[: i * 160], i.to_bytes(32, "little"))
    assert index.longest(b"ns", base) == []
    assert len(index) == 199
    index._check()


def test_covering_finds_rows_that_run_past_the_prompt_or_differ_from_it() -> None:
    index = PrefixIndex()
    system = list(range(100, 400))
    index.insert(b"ns", [*system, 1, 2, 3], b"a" * 32)  # system prompt + question A
    index.insert(b"ns", [*system, 1, 2, 3, 4, 5], b"b" * 32)  # ... and its answer
    index.insert(b"ns", system[:64], b"c" * 32)  # a prefix row: not a covering one
    # Question B differs after the system prompt: the shortest row sharing it is A.
    assert index.covering(b"ns", [*system, 7, 8]) == (300, b"a" * 32, 303)
    assert index.longest(b"ns", [*system, 7, 8]) == [(64, b"c" * 32)]
    # A prompt that ends inside the rows shares all of itself.
    assert index.covering(b"ns", system[:200]) == (200, b"a" * 32, 303)
    # Differing at the first token shares nothing; another namespace holds nothing.
    assert index.covering(b"ns", [7, *system]) is None
    assert index.covering(b"other", system) is None
    # Only prefix rows: nothing covers.
    assert index.covering(b"ns", [*system, 1, 2, 3, 4, 5, 6]) is None
