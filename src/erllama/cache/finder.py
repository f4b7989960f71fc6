"""Finding the row a prompt should restore, and reading it: the lookup side of the cache.

Everything here runs on the event loop; file reads go to worker threads through a limiter
of their own, so a burst of saves never delays a lookup. The index and the rows belong to
the :class:`~erllama.cache.catalog.Catalog` the cache shares with its writers; what a
lookup finds damaged or vanished it hands back to the cache (``forget``), and a row another
process published it hands over to be adopted (``adopt``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import anyio

from ..config import CachePolicy
from .buffers import BufferPool
from .catalog import Catalog, Row
from .counters import Counters
from .format import CorruptRow, RowMeta
from .graveyard import RemovedBecause
from .key import Namespace, decode_tokens, encode_tokens
from .port import Restore
from .tiers import FileTier

__all__ = ["COVER_MAX_EXCESS", "RowFinder"]

log = logging.getLogger("erllama.cache")

#: A covering row (one that runs past where the prompt ends or differs) is restored, then
#: trimmed, only while the tokens trimmed off are at most this many times the tokens of
#: prefill it saves. Restoring is 15x (a GPU reading a disk row) to 1000x (a CPU reading
#: RAM) cheaper per token than prefilling, so 4 keeps every such restore a clear win.
COVER_MAX_EXCESS = 4


class RowFinder:
    """Lookups at admission (exact, ``parent_key``, longest prefix or covering row) and the
    routing query that answers the same question without loading anything."""

    def __init__(
        self,
        catalog: Catalog,
        counters: Counters,
        files: dict[str, FileTier],
        *,
        forget: Callable[[Row, RemovedBecause], None],
        adopt: Callable[[str, RowMeta], None],
    ) -> None:
        self.catalog = catalog
        self.counters = counters
        self.files = files
        self._forget = forget
        self._adopt = adopt
        self.read_limiter = anyio.CapacityLimiter(2)
        #: Reused buffers for file rows: a fresh multi-MB buffer costs its page faults.
        self.buffers = BufferPool(keep=2)

    async def lookup(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        parent_key: bytes | None,
        policy: CachePolicy,
        longer_than: int = 0,
    ) -> Restore | None:
        """The row to restore for ``tokens``, read and verified, or None: the exact row,
        then ``parent_key``'s, then the longest prefix row or a covering one that shares
        more. Only rows longer than ``longer_than`` (what the live KV already holds)."""
        t0 = time.perf_counter()
        tb = encode_tokens(tokens)
        key = ns.key_of_bytes(tb)
        self.counters.bump("lookups")
        try:
            row = self.catalog.get(key) if len(tokens) > longer_than else None
            if row is not None:
                hit = await self._try(row, tb, "exact")
                if hit is not None:
                    self.counters.bump("hits_exact")
                    return hit
            if parent_key is not None:
                hit = await self._resume(ns, tb, parent_key, policy, longer_than)
                if hit is not None:
                    self.counters.bump("hits_resume")
                    return hit
            # Unlike the reference, a stale parent_key still falls back to the walk.
            t1 = time.perf_counter()
            # A few fallbacks are plenty: each is only tried if the deeper one is damaged.
            candidates, covering = self.catalog.prefix.search(
                ns.id, tb, longer_than=longer_than, most=8
            )
            beat = max([longer_than, *(n for n, k in candidates if k != key)])
            cover = self._covering(covering, beat, policy)
            self.counters.bump("lookup_s", time.perf_counter() - t1)
            if cover is not None:
                row, common = cover
                hit = await self._try(row, tb, "prefix", keep=common)
                if hit is not None:
                    self.counters.bump("hits_longest_prefix")
                    return hit
            for _n, k in candidates:
                row = self.catalog.get(k)
                if row is None or k == key:
                    continue
                hit = await self._try(row, tb, "prefix")
                if hit is not None:
                    self.counters.bump("hits_longest_prefix")
                    return hit
            if not longer_than:
                self.counters.bump("misses")  # else the live KV serves it (note_live_hit)
            return None
        finally:
            self.counters.bump("load_s", time.perf_counter() - t0)

    async def _resume(
        self, ns: Namespace, tb: bytes, parent_key: bytes, policy: CachePolicy, longer_than: int
    ) -> Restore | None:
        # In this process a finish_key always names an indexed row: it is reserved (with its
        # bytes) before the key is handed out. A key this process does not know may have been
        # saved by another engine sharing the file tiers: look for it there.
        row = self.catalog.get(parent_key)
        if row is None and self.files:
            row = await self._find_published(parent_key, policy.resume_wait_s)
        if row is None or row.ns_id != ns.id or row.n_tokens <= longer_than:
            return None
        return await self._try(row, tb, "parent")

    async def _find_published(self, key: bytes, wait_s: float) -> Row | None:
        """Adopt ``key`` from a file tier if another process published it; while one of its
        temps exists (being published right now), wait up to ``wait_s`` for it."""
        deadline = anyio.current_time() + wait_s
        while True:
            writing = False
            for name, tier in self.files.items():
                try:
                    meta, busy = await anyio.to_thread.run_sync(
                        tier.probe, key, limiter=self.read_limiter
                    )
                except OSError as exc:
                    # EACCES, EIO: that tier cannot answer; a miss there, never a failed
                    # lookup (the request would still run, but cold, with a traceback).
                    log.debug("cache probe of %s in %s failed: %s", key.hex(), name, exc)
                    continue
                if meta is not None:
                    self._adopt(name, meta)
                    return self.catalog.get(key)
                writing = writing or busy
            if not writing or anyio.current_time() >= deadline:
                return None
            await anyio.sleep(0.01)

    def _covering(
        self, found: tuple[int, bytes, int] | None, beat: int, policy: CachePolicy
    ) -> tuple[Row, int] | None:
        """The covering row the index ``found`` (one that runs past where the prompt ends or
        differs from it), if it shares more of the prompt than ``beat`` tokens (the deepest
        prefix row, or the live KV): (row, tokens shared). Worth it only when it saves at
        least ``policy.min_tokens`` of prefill and the tokens restored only to be trimmed
        are at most ``COVER_MAX_EXCESS`` times the tokens it saves: restoring a token costs
        far less than prefilling it, but not nothing (a disk row on a fast GPU)."""
        if found is None:
            return None
        common, key, length = found
        gain = common - beat
        if gain < policy.min_tokens or length - common > COVER_MAX_EXCESS * gain:
            return None
        row = self.catalog.get(key)
        if row is None or (not row.available and row.payload is None):
            return None
        return row, common

    async def _try(
        self,
        row: Row,
        tb: bytes,
        source: Literal["exact", "parent", "prefix"],
        *,
        keep: int | None = None,
    ) -> Restore | None:
        """Load ``row`` if its tokens are a true prefix of the prompt, or with ``keep`` if
        it shares exactly its first ``keep`` tokens with the prompt and runs past them (a
        covering row, trimmed after unpacking); None on any failure."""
        # Token-exact, always: the hash implies it, the bytes prove it.
        if keep is None:
            if len(row.token_bytes) > len(tb) or not tb.startswith(row.token_bytes):
                return None
            shared = row.token_bytes
        else:
            shared = tb[: 4 * keep]
            if len(row.token_bytes) <= len(shared) or not row.token_bytes.startswith(shared):
                return None
        if not row.available and row.payload is None:
            return None
        payload: bytes | bytearray | memoryview | None = row.payload
        if payload is None:
            row.pins += 1
            try:
                payload = await self.read_file(row)
            finally:
                row.pins -= 1
            if payload is None:
                return None
        row.hits += 1
        if row.key in self.catalog.rows:
            self.catalog.touch(row)
        return Restore(
            key=row.key,
            tokens=decode_tokens(shared),
            payload=payload,
            source=source,
            tier=row.tier,
            row_tokens=row.n_tokens,
        )

    async def read_file(self, row: Row) -> bytes | bytearray | memoryview | None:
        """A file row's payload in a pooled buffer (give it back), verified; None when the
        file is damaged (removed), gone or unreadable."""
        tier = self.files[row.tier]
        hits = row.hits + 1

        def read() -> tuple[RowMeta, bytearray | memoryview]:
            meta, payload = tier.read(row.key, self.buffers.take)
            tier.touch_hits(row.key, hits)  # persisted: biases LRU order after a restart
            return meta, payload

        try:
            meta, payload = await anyio.to_thread.run_sync(read, limiter=self.read_limiter)
        except CorruptRow as exc:
            log.warning("cache row %s in %s is corrupt (%s); removed", row.key.hex(), row.tier, exc)
            self.counters.bump("corrupt_files")
            self._forget(row, "corrupt")
            return None
        except FileNotFoundError:
            # Deleted behind our back (another process, an operator).
            self._forget(row, "deleted")
            return None
        except OSError as exc:
            log.warning("cache row %s unreadable: %s", row.key.hex(), exc)
            return None
        if meta.token_bytes != row.token_bytes:
            self.buffers.give(payload)
            self.counters.bump("corrupt_files")
            self._forget(row, "corrupt")
            await anyio.to_thread.run_sync(tier.delete, row.key)
            return None
        return payload

    def release(self, restore: Restore) -> None:
        """The restore has been unpacked: its buffer may be reused."""
        self.buffers.give(restore.payload)

    def peek_longest(
        self, ns: Namespace, tokens: Sequence[int], policy: CachePolicy
    ) -> tuple[int, str, bytes] | None:
        """What a lookup of ``tokens`` would restore from a row, read from the index alone
        (nothing is loaded, no hit counted): (tokens restored, tier, the row's key). The
        longest available prefix row, or a covering row that shares more (as ``lookup``
        would choose it)."""
        prefixes, covering = self.catalog.prefix.search(ns.id, encode_tokens(tokens))
        best: tuple[int, str, bytes] | None = None
        for n, key in prefixes:
            row = self.catalog.get(key)
            if row is not None and (row.available or row.payload is not None):
                best = (n, row.tier, key)
                break
        cover = self._covering(covering, 0 if best is None else best[0], policy)
        if cover is not None:
            row, common = cover
            return common, row.tier, row.key
        return best
