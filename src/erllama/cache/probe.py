"""What the cache holds near a prompt, read from the indexes alone: the facts a miss is
explained from (``erllama.model.explain`` turns them into a
:class:`~erllama.events.CacheExplanation`).

Nothing is loaded and no hit is counted. Each part is one walk along the prompt in a
radix trie, so a probe costs time proportional to the prompt: the model's own namespace,
the record of removed rows (:mod:`.graveyard`), and, when asked, every other namespace
(another model file, adapter set, quantisation or KV layout), at most
:data:`FOREIGN_NAMESPACES` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .catalog import Catalog
from .graveyard import Grave
from .key import Namespace, encode_tokens

__all__ = ["FOREIGN_NAMESPACES", "CacheProbe", "NearRow", "probe"]

#: Other namespaces a probe searches at most (each costs one walk along the prompt).
FOREIGN_NAMESPACES = 64
#: Prefix rows on the prompt's path a probe reports at most (deepest first).
PREFIX_ROWS = 16


@attrs.frozen(kw_only=True)
class NearRow:
    """A row sharing ``common`` leading tokens with the prompt."""

    common: int
    key: bytes
    ns_id: bytes
    #: The row's whole token list (u32 LE).
    token_bytes: bytes
    tier: str


@attrs.frozen(kw_only=True)
class CacheProbe:
    """What a probe found (see the module docstring)."""

    #: The model's own row sharing the most of the prompt (a prefix of it, or one that
    #: runs past where it ends or differs).
    nearest: NearRow | None = None
    #: Every own row that is a prefix of the prompt, as (length, key, tier), deepest first.
    prefixes: tuple[tuple[int, bytes, str], ...] = ()
    #: The removed row of the same namespace sharing the most, and how much it shares.
    gone: tuple[int, Grave] | None = None
    #: The row of another namespace sharing the most (only when asked).
    foreign: NearRow | None = None


def probe(
    catalog: Catalog, ns: Namespace, tokens: Sequence[int] | bytes, *, foreign: bool
) -> CacheProbe:
    """See the module docstring. ``foreign``: search other namespaces too (a request with
    a cache salt must not learn what other salts' requests left)."""
    tb = tokens if isinstance(tokens, bytes) else encode_tokens(tokens)
    index = catalog.prefix
    nearest = _row(catalog, index.nearest(ns.id, tb))
    prefixes = tuple(
        (n, key, row.tier)
        for n, key in index.longest(ns.id, tb, most=PREFIX_ROWS)
        if (row := catalog.get(key)) is not None
    )
    gone = catalog.graveyard.nearest(ns.id, tb)
    other: NearRow | None = None
    if foreign:
        for ns_id in index.namespaces()[:FOREIGN_NAMESPACES]:
            if ns_id == ns.id:
                continue
            near = _row(catalog, index.nearest(ns_id, tb))
            if near is not None and (other is None or near.common > other.common):
                other = near
    return CacheProbe(nearest=nearest, prefixes=prefixes, gone=gone, foreign=other)


def _row(catalog: Catalog, found: tuple[int, bytes, int] | None) -> NearRow | None:
    if found is None:
        return None
    row = catalog.get(found[1])
    if row is None:
        return None
    return NearRow(
        common=found[0],
        key=row.key,
        ns_id=row.ns_id,
        token_bytes=row.token_bytes,
        tier=row.tier,
    )
