"""Routing queries: what a model holds, for routers placing requests.

Pure functions over the cache port and a :class:`~erllama.model.snapshot.ThreadView`: they
never wait for the model thread, load nothing and count no hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..cache.key import Namespace, common_prefix_tokens, encode_tokens, salted
from ..cache.port import CachePort
from ..cluster.prefixes import PrefixSummary, chain_hashes
from ..config import CachePolicy
from ..events import CachedPrefix
from .snapshot import ThreadView

__all__ = ["ChainMemo", "cached_prefix", "cached_prefixes", "prefix_summary"]

#: (row key, block) -> the row's chain hashes (computed once; see :func:`prefix_summary`).
ChainMemo = dict[tuple[bytes, int], list[int]]


def cached_prefix(
    cache: CachePort,
    namespace: Callable[[bytes], Namespace],
    policy: CachePolicy,
    view: ThreadView,
    tokens: Sequence[int],
    cache_salt: str | None = None,
) -> CachedPrefix:
    """How many leading tokens of ``tokens`` a request would not have to prefill, and where
    they would come from: a cache tier, or a sequence's live KV. Only what requests with
    the same ``cache_salt`` left counts."""
    fp = salted(view.fingerprint, cache_salt)
    best = CachedPrefix(tokens=0, tier=None)
    if cache.enabled:
        found = cache.peek_longest(namespace(fp), tokens, policy)
        if found is not None:
            best = CachedPrefix(tokens=found[0], tier=found[1], key=found[2].hex())
    if view.live:
        encoded = encode_tokens(tokens)
        for live in view.live:
            if live.fingerprint == fp:
                n = common_prefix_tokens(live.tokens, encoded)
                if n > best.tokens:
                    best = CachedPrefix(tokens=n, tier="live")
    return best


def prefix_summary(
    cache: CachePort,
    namespace: Callable[[bytes], Namespace],
    view: ThreadView,
    block: int,
    limit: int,
    memo: ChainMemo,
) -> tuple[PrefixSummary, ChainMemo]:
    """What the model holds, as chain hashes of whole blocks (``erllama.cluster``): its cache
    rows, oldest first, then its sequences' live KV. Returns the summary and the memo for
    the next call (rows that are gone are forgotten)."""
    summary = PrefixSummary(block=block, limit=limit)
    fp = view.fingerprint
    seen: ChainMemo = {}
    if cache.enabled:
        for row in reversed(cache.rows_of(namespace(fp))):
            chain = memo.get((row.key, block))
            if chain is None:
                chain = chain_hashes(row.token_bytes, block)
            seen[row.key, block] = chain
            summary.add_chain(chain, row.tier)
    for live in view.live:
        if live.fingerprint == fp:
            summary.add(live.tokens, "live")
    return summary, seen


def cached_prefixes(
    cache: CachePort, namespace: Callable[[bytes], Namespace], view: ThreadView
) -> list[CachedPrefix]:
    """Every cache row of the model under its current adapter set, newest first."""
    if not cache.enabled:
        return []
    return [
        CachedPrefix(tokens=r.n_tokens, tier=r.tier, key=r.key.hex())
        for r in cache.rows_of(namespace(view.fingerprint))
    ]
