"""A bounded record of rows the cache removed, so a later miss can say "evicted, and when".

Only rows that were published (servable) are recorded: a reservation that never became a
row was never a hit to lose. The record is searchable like the live index (a
:class:`~erllama.cache.index.PrefixIndex` of its own), so finding the removed row nearest
to a prompt costs what a lookup costs. It forgets oldest first past ``entries`` rows or
``token_bytes`` bytes of token lists, and forgets a key at once when a row with that key
is indexed again (then it is not gone). Event loop only, like the catalogue.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import attrs

from .index import PrefixIndex

__all__ = ["GONE_ENTRIES", "GONE_TOKEN_BYTES", "Graveyard", "Grave", "RemovedBecause"]

#: Removed rows remembered at most, and the most bytes of their token lists kept.
GONE_ENTRIES = 1024
GONE_TOKEN_BYTES = 16 * 1024 * 1024

#: Why a row left the cache: a tier's budget (``evicted``), memory pressure, ``gc``, damage
#: found when it was read (``corrupt``), or its file deleted by someone else (``deleted``).
RemovedBecause = Literal["evicted", "pressure", "gc", "corrupt", "deleted"]


@attrs.frozen(kw_only=True)
class Grave:
    """One removed row."""

    key: bytes
    ns_id: bytes
    token_bytes: bytes
    tier: str
    #: Unix time (``time.time()``) of the removal.
    removed_at: float
    why: RemovedBecause


class Graveyard:
    """See the module docstring."""

    def __init__(self, entries: int = GONE_ENTRIES, token_bytes: int = GONE_TOKEN_BYTES) -> None:
        self._entries = entries
        self._budget = token_bytes
        self._graves: OrderedDict[bytes, Grave] = OrderedDict()
        self._bytes = 0
        self._index = PrefixIndex()

    def __len__(self) -> int:
        return len(self._graves)

    def record(
        self, key: bytes, ns_id: bytes, token_bytes: bytes, tier: str, why: RemovedBecause
    ) -> None:
        if len(token_bytes) > self._budget:
            return
        self.discard(key)
        grave = Grave(
            key=key,
            ns_id=ns_id,
            token_bytes=token_bytes,
            tier=tier,
            removed_at=time.time(),
            why=why,
        )
        self._graves[key] = grave
        self._bytes += len(token_bytes)
        self._index.insert(ns_id, token_bytes, key)
        while len(self._graves) > self._entries or self._bytes > self._budget:
            _, old = self._graves.popitem(last=False)
            self._forget(old)

    def discard(self, key: bytes) -> None:
        """A row with ``key`` is indexed again: it is not gone."""
        grave = self._graves.pop(key, None)
        if grave is not None:
            self._forget(grave)

    def _forget(self, grave: Grave) -> None:
        self._bytes -= len(grave.token_bytes)
        self._index.remove(grave.ns_id, grave.token_bytes, grave.key)

    def nearest(self, ns_id: bytes, tokens: Sequence[int] | bytes) -> tuple[int, Grave] | None:
        """The removed row of namespace ``ns_id`` sharing the most leading tokens with
        ``tokens``, and how many it shares; None when none shares a token."""
        found = self._index.nearest(ns_id, tokens)
        if found is None:
            return None
        return found[0], self._graves[found[1]]
