"""Why a prompt was restored as far as it was: a :class:`~erllama.events.CacheExplanation`
for every request (``Stats.cache_explain``) and for ``Engine.explain_prefix``.

Two steps, on two sides:

1. :func:`probe_prompt` (event loop, at the lookup): what the model holds nearest to the
   prompt. The cache's indexes (its own rows, the record of removed rows, and for an
   unsalted request the other namespaces: :mod:`erllama.cache.probe`), the live KV of its
   sequences (the thread's snapshot), and :class:`Tails`: the tokens each finished request
   computed past the cells it kept. Under the exactness rule a request keeps only its
   prompt's whole grid cells; the rest of its prompt and its reply were computed and
   dropped. A follow-up prompt that goes on with exactly those tokens matched them, and
   "grid" says that this, not the prompt, is why the restore stopped there.
2. :func:`explain` (model thread after setup, or loop for ``explain_prefix``): that, with
   the hit the request got, gives the cause and the excerpts.

A request with a cache salt is explained from its own namespace only: what requests under
other salts (other API keys) left is never revealed, not even that it exists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Literal

import attrs

from ..cache.graveyard import Grave
from ..cache.key import Namespace, common_prefix_tokens, decode_tokens, encode_tokens
from ..cache.port import CachePort
from ..cache.probe import NearRow
from ..events import CacheExplanation, CacheHit, MissCause
from .snapshot import LivePrefix

__all__ = ["EXCERPT_TOKENS", "Near", "Probe", "Tails", "explain", "probe_prompt"]

#: Tokens shown on each side of the point where a prompt left its nearest row.
EXCERPT_TOKENS = 8
#: Finished requests whose dropped tokens are remembered, and the most kept of each.
TAIL_ENTRIES = 256
TAIL_TOKENS = 4096


class Tails:
    """Row key -> the tokens a finished request computed past that row (the part of its
    prompt short of a whole grid cell, its reply and the end-of-generation token), which
    the exactness rule does not keep. Least recently used dropped past ``entries``. Event
    loop only."""

    def __init__(self, entries: int = TAIL_ENTRIES) -> None:
        self._entries = entries
        self._tails: OrderedDict[bytes, bytes] = OrderedDict()

    def remember(self, key: bytes, tail: Sequence[int]) -> None:
        if not tail:
            return
        self._tails[key] = encode_tokens(tail[:TAIL_TOKENS])
        self._tails.move_to_end(key)
        while len(self._tails) > self._entries:
            self._tails.popitem(last=False)

    def get(self, key: bytes) -> bytes | None:
        return self._tails.get(key)


@attrs.frozen(kw_only=True)
class Near:
    """The model's own context nearest to a prompt: a row, or a sequence's live KV,
    possibly followed by what its request computed past it."""

    #: Leading prompt tokens it agrees with.
    common: int
    #: Of those, the tokens a row or the live KV holds (the rest were computed and dropped).
    kept: int
    #: Its next tokens from ``common`` on (the row side of the excerpt).
    ahead: tuple[int, ...]
    #: A tier, or ``live``.
    tier: str
    key: bytes | None = None
    n_tokens: int = 0


ForeignCause = Literal["fingerprint", "adapter", "layout"]


@attrs.frozen(kw_only=True)
class Probe:
    """What :func:`probe_prompt` found for one prompt."""

    own: Near | None = None
    gone: tuple[int, Grave] | None = None
    foreign: NearRow | None = None
    foreign_cause: ForeignCause | None = None


def probe_prompt(
    cache: CachePort,
    ns: Namespace,
    prompt: Sequence[int],
    live: Sequence[LivePrefix],
    tails: Tails,
    *,
    foreign: bool,
    known_fingerprints: Collection[bytes] = (),
) -> Probe:
    """See the module docstring. ``live``: the model's live prefixes (those under other
    fingerprints are skipped); ``known_fingerprints``: the model's own fingerprints under
    other adapter sets (a row under one of them is an ``adapter`` miss)."""
    tb = encode_tokens(prompt)
    found = cache.probe(ns, prompt, foreign=foreign)
    best: Near | None = None

    def consider(near: Near) -> None:
        nonlocal best
        if near.common and (best is None or (near.common, near.kept) > (best.common, best.kept)):
            best = near

    def with_tail(n: int, key: bytes, tier: str, n_tokens: int) -> None:
        tail = tails.get(key)
        if tail is None:
            return
        ext = common_prefix_tokens(tail, tb[4 * n :])
        ahead = decode_tokens(tail[4 * ext : 4 * (ext + EXCERPT_TOKENS)])
        consider(Near(common=n + ext, kept=n, ahead=ahead, tier=tier, key=key, n_tokens=n_tokens))

    row = found.nearest
    if row is not None:
        c = row.common
        consider(
            Near(
                common=c,
                kept=c,
                ahead=decode_tokens(row.token_bytes[4 * c : 4 * (c + EXCERPT_TOKENS)]),
                tier=row.tier,
                key=row.key,
                n_tokens=len(row.token_bytes) // 4,
            )
        )
    for n, key, tier in found.prefixes:
        with_tail(n, key, tier, n)
    for lp in live:
        if lp.fingerprint != ns.fingerprint:
            continue
        n = common_prefix_tokens(lp.tokens, tb)
        size = len(lp.tokens) // 4
        ahead = decode_tokens(lp.tokens[4 * n : 4 * (n + EXCERPT_TOKENS)])
        consider(Near(common=n, kept=n, ahead=ahead, tier="live", n_tokens=size))
        if n and n == size:
            with_tail(n, ns.key_of_bytes(lp.tokens), "live", size)
    cause: ForeignCause | None = None
    other = found.foreign
    if other is not None:
        fp = other.ns_id[:32]
        if fp == ns.fingerprint:
            cause = "layout"
        elif fp in known_fingerprints:
            cause = "adapter"
        else:
            cause = "fingerprint"
    return Probe(own=best, gone=found.gone, foreign=other, foreign_cause=cause)


def explain(
    probe: Probe | None,
    hit: CacheHit,
    prompt: Sequence[int],
    grid: int,
    decode: Callable[[Sequence[int]], str],
) -> CacheExplanation:
    """The explanation of a request that got ``hit`` for ``prompt`` (``probe`` None: the
    cache is off). ``decode`` turns excerpt token ids into text."""
    n = len(prompt)
    restored = hit.prefix_len
    tier = None
    if hit.kind != "cold":
        tier = "live" if hit.source in ("live", "session") else hit.tier
        tier = "shared" if hit.source == "shared" else tier
    base = {"prompt_tokens": n, "restored": restored, "tier": tier, "grid": grid}
    if hit.kind == "exact":
        return CacheExplanation(matched=n, cause=None, **base)  # type: ignore[arg-type]
    if hit.source == "shared":
        # Taken from a request that was prefilling the same prefix at the same time; the
        # rest of this prompt is its own (or the last cell, re-fed for its logits).
        return CacheExplanation(matched=restored, cause="shared", **base)  # type: ignore[arg-type]
    if probe is None:
        return CacheExplanation(matched=restored, cause="disabled", **base)  # type: ignore[arg-type]
    own = probe.own
    mine = own.common if own is not None else 0
    gone = probe.gone[0] if probe.gone is not None else 0
    other = probe.foreign.common if probe.foreign is not None else 0

    def at(position: int, ahead: Sequence[int], **more: object) -> CacheExplanation:
        cut = position if position < n else None
        shown = prompt[max(0, position - EXCERPT_TOKENS) : position]
        next_ids = prompt[position : position + EXCERPT_TOKENS]
        return CacheExplanation(
            matched=position,
            position=cut,
            shared_text=decode(shown),
            prompt_text=decode(next_ids),
            prompt_ids=tuple(next_ids),
            row_text=decode(ahead),
            row_ids=tuple(ahead),
            **base,  # type: ignore[arg-type]
            **more,  # type: ignore[arg-type]
        )

    if probe.gone is not None and gone > mine and gone >= other:
        grave = probe.gone[1]
        return at(
            gone,
            decode_tokens(grave.token_bytes[4 * gone : 4 * (gone + EXCERPT_TOKENS)]),
            cause="evicted",
            row_key=grave.key.hex(),
            row_tokens=len(grave.token_bytes) // 4,
            row_tier=grave.tier,
            evicted_at=grave.removed_at,
            evicted_because=grave.why,
        )
    if probe.foreign is not None and probe.foreign_cause is not None and other > mine:
        row = probe.foreign
        return at(
            other,
            (),
            cause=probe.foreign_cause,
            row_key=row.key.hex(),
            row_tokens=len(row.token_bytes) // 4,
            row_tier=row.tier,
            row_fingerprint=row.ns_id[:32].hex(),
        )
    if own is None:
        return CacheExplanation(matched=0, cause="no_row", **base)  # type: ignore[arg-type]
    cause: MissCause
    if (min(own.kept, n - 1) // grid) * grid > restored:
        # A whole cell more was at hand than was restored: the lookup's policy passed it up.
        cause = "policy"
    elif own.common > own.kept or own.common >= n:
        cause = "grid"
    elif own.ahead:
        cause = "diverged"
    else:
        cause = "extends"
    return at(
        own.common,
        own.ahead,
        cause=cause,
        row_key=own.key.hex() if own.key is not None else None,
        row_tokens=own.n_tokens,
        row_tier=own.tier,
    )
