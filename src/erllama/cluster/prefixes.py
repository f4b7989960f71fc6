"""What token prefixes an engine holds, in a form a router can match without the tokens.

A token list is cut into aligned blocks of ``block`` tokens and each block gets a 64-bit hash
chained from the start: ``h[i] = xxh3_64(h[i-1] || tokens of block i)``. Two lists share
their first ``i`` blocks exactly when their ``h[i - 1]`` are equal (up to 64-bit collisions),
so a replica that reports the set of chain hashes of what it holds lets a router find, for a
new prompt, the longest whole-block prefix the replica could restore: walk the prompt's own
chain until a hash is missing. The report grows with the number of distinct blocks held,
never with a prompt's length, and it is capped (most recently used first).

Each hash carries the cheapest place the replica holds it: a sequence's live KV or the RAM
tier, a ``/dev/shm`` file, a disk file; a router credits file tiers at their restore cost.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import attrs
import xxhash

__all__ = ["BLOCK", "TIER_RANK", "PrefixSummary", "chain_hashes", "matched_blocks"]

#: Tokens per block: a router can credit a prefix to within this many tokens.
BLOCK = 64
#: Where a prefix is, cheapest first.
TIER_RANK = {"live": 0, "session": 0, "ram": 0, "ram_file": 1, "disk": 2}


def chain_hashes(tokens: Sequence[int] | bytes, block: int = BLOCK) -> list[int]:
    """The chained hash of every whole block of ``tokens`` (ids, or their u32 little-endian
    bytes as the cache stores them), in order."""
    raw = tokens if isinstance(tokens, bytes) else array("I", tokens).tobytes()
    width = 4 * block
    out: list[int] = []
    h = 0
    for end in range(width, len(raw) + 1, width):
        h = xxhash.xxh3_64_intdigest(raw[end - width : end], seed=h)
        out.append(h)
    return out


def matched_blocks(prompt_chain: Sequence[int], held: Mapping[int, int]) -> tuple[int, int]:
    """How many leading blocks of a prompt (given its chain) ``held`` has, and the worst
    tier rank among them (the restore comes from the row that holds them all)."""
    n, rank = 0, 0
    for h in prompt_chain:
        r = held.get(h)
        if r is None:
            break
        n += 1
        rank = max(rank, r)
    return n, rank


@attrs.define
class PrefixSummary:
    """A replica's held prefixes: chain hash -> tier rank, most recently added last, capped
    at ``limit`` hashes. Built on the replica, sent to routers as :meth:`to_wire`."""

    block: int = BLOCK
    limit: int = 65_536
    held: OrderedDict[int, int] = attrs.Factory(OrderedDict)

    def add(self, tokens: Sequence[int] | bytes, tier: str) -> None:
        self.add_chain(chain_hashes(tokens, self.block), tier)

    def add_chain(self, chain: Sequence[int], tier: str) -> None:
        rank = TIER_RANK.get(tier, 2)
        for h in chain:
            old = self.held.pop(h, None)
            self.held[h] = rank if old is None else min(old, rank)
        while len(self.held) > self.limit:
            self.held.popitem(last=False)

    def to_wire(self) -> dict[str, object]:
        """A compact, picklable form: hashes grouped by tier rank."""
        by_rank: dict[int, list[int]] = {}
        for h, r in self.held.items():
            by_rank.setdefault(r, []).append(h)
        return {
            "block": self.block,
            "tiers": {r: array("Q", hs).tobytes() for r, hs in by_rank.items()},
        }

    @staticmethod
    def from_wire(data: Mapping[str, object]) -> dict[int, int]:
        """The hash -> tier rank map a router matches prompts against."""
        held: dict[int, int] = {}
        tiers = data.get("tiers", {})
        assert isinstance(tiers, Mapping)
        for rank, raw in tiers.items():
            arr = array("Q")
            arr.frombytes(raw)
            for h in arr:
                held[h] = int(rank)
        return held


def summary_of(
    rows: Iterable[tuple[Sequence[int] | bytes, str]], block: int = BLOCK
) -> PrefixSummary:
    """A summary of ``(tokens, tier)`` pairs, oldest first."""
    s = PrefixSummary(block=block)
    for tokens, tier in rows:
        s.add(tokens, tier)
    return s
