"""The in-memory catalogue of cache rows: where each lives, its LRU position, and the
prefix index over their token lists. Owned by the event loop (no locks)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator

import anyio
import attrs

from .graveyard import Graveyard
from .index import PrefixIndex
from .port import SaveReason

__all__ = ["TIERS", "Catalog", "Row"]

TIERS = ("ram", "ram_file", "disk")


@attrs.define(eq=False)
class Row:
    """One saved state. ``status`` is ``writing`` from reservation until published."""

    key: bytes
    ns_id: bytes
    token_bytes: bytes
    tier: str
    size: int
    reason: SaveReason
    status: str = "writing"
    hits: int = 0
    last_used: float = attrs.Factory(time.monotonic)
    #: Loads in progress: a pinned row is never evicted (its file must stay readable).
    pins: int = 0
    #: The bytes, for RAM rows, and for rows still being written (lookups may serve them).
    payload: bytes | bytearray | None = None
    #: Set when a RAM row is being spilled down; it stays servable from RAM meanwhile.
    spilling: bool = False
    published: anyio.Event = attrs.Factory(anyio.Event)
    reserved_at: float = attrs.Factory(time.monotonic)

    @property
    def n_tokens(self) -> int:
        return len(self.token_bytes) // 4

    @property
    def available(self) -> bool:
        return self.status == "available"


class Catalog:
    """Rows by key, per-tier LRU order and byte totals, and the prefix index.

    Invariant: a row is in ``rows``, in exactly one tier's LRU and byte total, and in the
    prefix index, from ``add`` until ``remove``; moving tiers goes through ``move``.
    """

    def __init__(self) -> None:
        self.rows: dict[bytes, Row] = {}
        self.lru: dict[str, OrderedDict[bytes, None]] = {t: OrderedDict() for t in TIERS}
        self.bytes: dict[str, int] = dict.fromkeys(TIERS, 0)
        self.prefix = PrefixIndex()
        #: Rows removed lately (see :mod:`.graveyard`): what explains an "evicted" miss.
        self.graveyard = Graveyard()

    def get(self, key: bytes) -> Row | None:
        return self.rows.get(key)

    def add(self, row: Row) -> None:
        assert row.key not in self.rows
        self.rows[row.key] = row
        self.lru[row.tier][row.key] = None
        self.bytes[row.tier] += row.size
        self.prefix.insert(row.ns_id, row.token_bytes, row.key)
        self.graveyard.discard(row.key)

    def remove(self, key: bytes) -> Row | None:
        row = self.rows.pop(key, None)
        if row is None:
            return None
        self.lru[row.tier].pop(key, None)
        self.bytes[row.tier] -= row.size
        self.prefix.remove(row.ns_id, row.token_bytes, key)
        row.published.set()  # wake any parent_key waiter: it will find no row
        return row

    def move(self, row: Row, tier: str, size: int) -> None:
        self.lru[row.tier].pop(row.key, None)
        self.bytes[row.tier] -= row.size
        row.tier, row.size = tier, size
        self.lru[tier][row.key] = None
        self.bytes[tier] += size

    def resize(self, row: Row, size: int) -> None:
        self.bytes[row.tier] += size - row.size
        row.size = size

    def touch(self, row: Row) -> None:
        row.last_used = time.monotonic()
        self.lru[row.tier].move_to_end(row.key)

    def oldest(self, tier: str) -> Iterator[Row]:
        """Rows of ``tier``, least recently used first, that may be evicted now."""
        for key in list(self.lru[tier]):
            row = self.rows.get(key)
            if row is not None and row.available and not row.pins and not row.spilling:
                yield row

    def count(self, tier: str) -> int:
        return len(self.lru[tier])

    def __len__(self) -> int:
        return len(self.rows)
