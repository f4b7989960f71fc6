"""The KV cache: saves handed to a bounded writer pool, three tiers with enforced budgets,
spills, the sweeper, and counters; lookups at admission are ``finder.py``'s.

Everything here runs on the event loop except file I/O, which goes to worker threads (reads
and writes have separate limiters, so a burst of saves never delays a lookup).

Life of a save: the model worker packs the sequence between ticks and calls :meth:`save`,
which never waits. A RAM-tier save is published at once. A file-tier save is *reserved*
(a ``writing`` row, holding the bytes so lookups and ``parent_key`` waiters can use them)
and queued for a writer; a full queue drops it (``saves_dropped``). A writer encodes the
row, writes a temp file, re-checks the reservation, links it into place and marks it
``available``. What a tier's budget cannot hold is spilled one tier down (RAM ->
ram_file -> disk) or, from the last tier, deleted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anyio
import attrs
from anyio.abc import TaskGroup

from ..config import CacheConfig, CachePolicy
from ..errors import CacheError
from .catalog import TIERS, Catalog, Row
from .counters import CacheCounters, Counters
from .faults import WriteFailures
from .finder import RowFinder
from .format import CorruptRow, RowMeta, encode_row, parse_row
from .graveyard import RemovedBecause
from .key import Namespace, encode_tokens
from .port import Restore, SaveReason
from .probe import CacheProbe, probe
from .tiers import FileTier

__all__ = ["KVCache"]

log = logging.getLogger("erllama.cache")

#: Leaving the engine waits at most this long for writers to finish.
DRAIN_TIMEOUT_S = 30.0
#: After the first failed write (logged in full), failures are summarised at most this often.
WRITE_FAILURE_LOG_INTERVAL_S = 60.0


@attrs.define(eq=False)
class _Job:
    kind: Literal["save", "spill"]
    row: Row
    tier: str
    payload: bytes | bytearray | None
    reason: SaveReason


def _namespace_of(ns_id: bytes) -> Namespace:
    return Namespace(ns_id[:32], ns_id[32], ns_id[33:65])


class KVCache:
    """The engine-wide cache shared by every model (rows are namespaced by model identity)."""

    enabled = True

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.catalog = Catalog()
        self.counters = Counters()
        self.files: dict[str, FileTier] = {}
        if config.ram_file_dir is not None and config.ram_file_bytes > 0:
            self.files["ram_file"] = FileTier("ram_file", config.ram_file_dir)
        if config.disk_dir is not None and config.disk_bytes > 0:
            self.files["disk"] = FileTier("disk", config.disk_dir)
        self.budget = {
            "ram": config.ram_bytes,
            "ram_file": config.ram_file_bytes,
            "disk": config.disk_bytes,
        }
        self.order = [t for t in TIERS if (t == "ram" and config.ram_bytes > 0) or t in self.files]
        self._jobs: deque[_Job] = deque()
        self._jobs_ready = anyio.Event()
        self._queued_saves = 0
        self._active_jobs = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._spilling_bytes = 0
        self._deleting: set[bytes] = set()
        #: Files to delete, handed to the deleter task (``_drop`` runs in plain loop
        #: callbacks too, where no task can be started).
        self._deletions: deque[tuple[FileTier, bytes]] = deque()
        self._deletions_ready = anyio.Event()
        self.finder = RowFinder(
            self.catalog,
            self.counters,
            self.files,
            forget=self._forget,
            adopt=lambda tier, meta: self._adopt(tier, meta, count=True),
        )
        self._write_limiter = anyio.CapacityLimiter(config.writers)
        self._tg: TaskGroup | None = None
        self._closing = False
        self._write_failures = WriteFailures(log, WRITE_FAILURE_LOG_INTERVAL_S)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, tg: TaskGroup) -> None:
        """Open the file tiers, rebuild the index from their files, start writers and sweeper."""
        self._tg = tg
        # First: trimming a tier found over budget below deletes files through it.
        tg.start_soon(self._deleter)
        for name, tier in self.files.items():
            await anyio.to_thread.run_sync(tier.open)
            metas, corrupt = await anyio.to_thread.run_sync(
                tier.scan, self.config.reservation_ttl_s
            )
            self.counters.bump("corrupt_files", corrupt)
            self._adopt_all(name, metas, count=False)
        for name in self.files:
            if self.catalog.bytes[name] > self.budget[name]:
                # A lowered budget, or a directory another engine fills: not an error. The
                # trim deletes (or spills) in the background; the engine serves meanwhile.
                log.info(
                    "cache tier %s holds %d bytes, over its budget of %d: trimming it,"
                    " least valuable rows first",
                    name,
                    self.catalog.bytes[name],
                    self.budget[name],
                )
            await self._enforce_budget(name)
        for _ in range(self.config.writers):
            tg.start_soon(self._writer)
        tg.start_soon(self._sweeper)

    async def close(self) -> None:
        """Stop taking saves, spill RAM rows to the next tier (so a restarted engine finds
        them), and wait for the writers to drain."""
        self._closing = True
        if "ram" in self.order and len(self.order) > 1:
            for row in list(self.catalog.oldest("ram")):
                self._start_spill(row)
        with anyio.move_on_after(DRAIN_TIMEOUT_S, shield=True) as scope:
            await self.drain()
        if scope.cancelled_caught:
            log.error("cache writers did not drain within %.0f s", DRAIN_TIMEOUT_S)
        self._write_failures.flush(anyio.current_time())
        for tier in self.files.values():
            tier.close()

    async def drain(self) -> None:
        """Wait until every queued write, spill and file deletion has finished."""
        while self._jobs or self._active_jobs or self._deleting:
            self._idle = anyio.Event()
            await self._idle.wait()

    def snapshot(self) -> CacheCounters:
        cur = {}
        for t in TIERS:
            cur[f"bytes_{t}"] = self.catalog.bytes[t]
            cur[f"rows_{t}"] = self.catalog.count(t)
        return self.counters.snapshot(**cur)

    # ---- lookups (finder.py) ----------------------------------------------------------------

    async def lookup(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        parent_key: bytes | None,
        policy: CachePolicy,
        longer_than: int = 0,
    ) -> Restore | None:
        return await self.finder.lookup(ns, tokens, parent_key, policy, longer_than)

    def release(self, restore: Restore) -> None:
        self.finder.release(restore)

    def reject(self, restore: Restore, why: str) -> None:
        row = self.catalog.get(restore.key)
        log.warning("backend refused cache row %s (%s); removed", restore.key.hex(), why)
        self.counters.bump("corrupt_files")
        if row is not None:
            self._drop(row, "corrupt")

    # ---- saves --------------------------------------------------------------------------------

    def prepare_save(
        self, ns: Namespace, tokens: Sequence[int], reason: SaveReason, policy: CachePolicy
    ) -> tuple[bytes | None, bool]:
        if self._closing:
            return None, False
        key = ns.key(tokens)
        if key in self.catalog.rows:
            self.counters.bump("duplicate_saves")
            return key, False
        if key in self._deleting:
            self.counters.bump("saves_dropped")
            return None, False
        return key, True

    def holds(self, key: bytes) -> bool:
        return key in self.catalog.rows

    def note_pack(self, seconds: float) -> None:
        self.counters.bump("pack_s", seconds)

    def note_dropped(self) -> None:
        self.counters.bump("saves_dropped")

    def note_live_hit(self) -> None:
        self.counters.bump("hits_live")

    def save(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        payload: bytes | bytearray,
        reason: SaveReason,
    ) -> bytes | None:
        if self._closing:
            return None
        tb = encode_tokens(tokens)
        key = ns.key_of_bytes(tb)
        if key in self.catalog.rows:
            self.counters.bump("duplicate_saves")
            return key
        size = len(payload)
        for tier in self.order:
            if size > self.budget[tier]:
                continue
            if tier == "ram":
                if not self._room_in_ram(size):
                    continue
                row = Row(
                    key=key, ns_id=ns.id, token_bytes=tb, tier="ram", size=size, reason=reason
                )
                row.payload, row.status = payload, "available"
                self.catalog.add(row)
                row.published.set()
                self.counters.bump(f"saves_{reason}")
                return key
            if self._queued_saves >= self.config.writer_queue + self.config.writers:
                break  # writers busy: drop rather than stall generation
            row = Row(key=key, ns_id=ns.id, token_bytes=tb, tier=tier, size=size, reason=reason)
            row.payload = payload  # servable while it is written
            self.catalog.add(row)
            self._queued_saves += 1
            self._enqueue(_Job("save", row, tier, payload, reason))
            return key
        self.counters.bump("saves_dropped")
        return None

    def _room_in_ram(self, size: int) -> bool:
        """Make room for ``size`` bytes in RAM by spilling (or dropping) LRU rows.

        Rows being spilled still occupy RAM until written; they may overshoot the budget by
        at most the budget itself, after which new saves go straight to a file tier."""
        budget = self.budget["ram"]
        for victim in self.catalog.oldest("ram"):
            if self.catalog.bytes["ram"] - self._spilling_bytes + size <= budget:
                break
            self._evict(victim)
        settled = self.catalog.bytes["ram"] - self._spilling_bytes + size <= budget
        return settled and self.catalog.bytes["ram"] + size <= 2 * budget

    def _evict(self, row: Row) -> None:
        """Move ``row`` one tier down, or delete it from the last one."""
        below = self.order[self.order.index(row.tier) + 1 :]
        target = next((t for t in below if row.size <= self.budget[t]), None)
        if target is not None and not self._closing:
            self._start_spill(row, target)
        else:
            self.counters.bump("evictions")
            self._drop(row, "evicted")

    def _start_spill(self, row: Row, target: str | None = None) -> None:
        if row.spilling:
            return
        if target is None:
            below = self.order[self.order.index(row.tier) + 1 :]
            target = next((t for t in below if row.size <= self.budget[t]), None)
            if target is None:
                return
        row.spilling = True
        if row.tier == "ram":
            self._spilling_bytes += row.size
        self._enqueue(_Job("spill", row, target, row.payload, row.reason))

    def _drop(self, row: Row, why: RemovedBecause) -> None:
        """Forget a row and delete its bytes (file deletion happens off the loop)."""
        self._forget(row, why)
        if row.tier in self.files:
            self._deleting.add(row.key)
            self._deletions.append((self.files[row.tier], row.key))
            self._deletions_ready.set()

    async def _deleter(self) -> None:
        """Deletes dropped rows' files, a batch per worker-thread hop."""
        while True:
            while not self._deletions:
                self._deletions_ready = anyio.Event()
                await self._deletions_ready.wait()
            batch = list(self._deletions)
            self._deletions.clear()

            def delete_all(batch: list[tuple[FileTier, bytes]] = batch) -> None:
                for tier, key in batch:
                    try:
                        tier.delete(key)
                    except OSError as exc:
                        log.warning("cache row %s could not be deleted: %s", key.hex(), exc)

            try:
                await anyio.to_thread.run_sync(delete_all)
            finally:
                for _, key in batch:
                    self._deleting.discard(key)
                self._idle.set()

    def _forget(self, row: Row, why: RemovedBecause | None = None) -> None:
        """Unindex ``row``. With ``why``, a published row is remembered as removed (what
        explains a later miss); without, it was never servable or is not gone (a failed
        save, an expired reservation)."""
        if self.catalog.get(row.key) is row:
            if why is not None and row.available:
                self.catalog.graveyard.record(row.key, row.ns_id, row.token_bytes, row.tier, why)
            self.catalog.remove(row.key)
            if row.spilling and row.tier == "ram":
                self._spilling_bytes -= row.size
            row.payload = None

    # ---- writers ------------------------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._jobs_ready.set()

    async def _writer(self) -> None:
        while True:
            while not self._jobs:
                self._jobs_ready = anyio.Event()
                await self._jobs_ready.wait()
            job = self._jobs.popleft()
            self._active_jobs += 1
            try:
                await self._run(job)
            except Exception as exc:
                # ENOSPC, EIO, EACCES, a name occupied by a directory...: the row is dropped
                # (a save) or stays where it is (a spill); generation never notices.
                self.counters.bump("save_errors")
                what = f"{job.kind} of row {job.row.key.hex()} to {job.tier}"
                self._write_failures.note(exc, what, anyio.current_time())
                self._abandon(job)
            finally:
                self._active_jobs -= 1
                if job.kind == "save":
                    self._queued_saves -= 1
                self._idle.set()

    def _abandon(self, job: _Job) -> None:
        row = job.row
        if job.kind == "save":
            if self.catalog.get(row.key) is row and not row.available:
                self.counters.bump("saves_dropped")
                self._forget(row)
        elif row.spilling:
            row.spilling = False
            if row.tier == "ram":
                self._spilling_bytes -= row.size

    async def _run(self, job: _Job) -> None:
        row, tier = job.row, self.files[job.tier]
        if self.catalog.get(row.key) is not row:
            return  # evicted or dropped while queued
        payload: bytes | bytearray | memoryview | None = job.payload
        pooled = payload is None
        if payload is None:  # spilling a file row: read it back first
            payload = await self.finder.read_file(row)
            if payload is None:
                return
        try:
            await self._write(job, row, tier, payload)
        finally:
            if pooled:
                self.finder.buffers.give(payload)

    async def _write(
        self, job: _Job, row: Row, tier: FileTier, payload: bytes | bytearray | memoryview
    ) -> None:
        ns = _namespace_of(row.ns_id)
        data = payload

        def write() -> tuple[Path, int]:
            prefix = encode_row(ns, row.token_bytes, job.reason, data)
            return tier.write_tmp(row.key, prefix, data), len(prefix) + len(data)

        tmp, size = await anyio.to_thread.run_sync(write, limiter=self._write_limiter)
        # Re-check the reservation right before linking: if the row was dropped meanwhile
        # (evicted, expired), publishing would resurrect a row nobody tracks.
        if self.catalog.get(row.key) is not row:
            await anyio.to_thread.run_sync(tier.abort_tmp, tmp)
            return
        outcome = await anyio.to_thread.run_sync(
            tier.publish, tmp, row.key, limiter=self._write_limiter
        )
        if self.catalog.get(row.key) is not row:
            return  # dropped while publishing; the sweeper adopts or deletes the file
        if outcome == "adopted":
            self.counters.bump("duplicate_saves")
        source = row.tier
        if job.kind == "save":
            self.catalog.resize(row, size)
            row.status = "available"
            row.payload = None
            self.counters.bump(f"saves_{job.reason}")
        else:
            if source == "ram":
                self._spilling_bytes -= row.size
            self.catalog.move(row, job.tier, size)
            row.spilling = False
            row.payload = None
            self.counters.bump("spills")
            if source in self.files:
                old = self.files[source]
                await anyio.to_thread.run_sync(old.delete, row.key)
        row.published.set()
        await self._enforce_budget(job.tier)

    async def _enforce_budget(self, tier: str) -> None:
        budget = self.budget[tier]
        for victim in self.catalog.oldest(tier):
            if self.catalog.bytes[tier] <= budget:
                break
            self._evict(victim)

    # ---- sweeper -------------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("cache sweep failed")

    async def sweep(self) -> None:
        """One maintenance round: expire abandoned reservations, remove stale temps, adopt
        valid row files this process does not know (published by another process, or left
        by a writer that died between link and publish) and delete invalid ones."""
        ttl = self.config.reservation_ttl_s
        now = time.monotonic()
        queued = {id(j.row) for j in self._jobs}
        for row in list(self.catalog.rows.values()):
            if not row.available and now - row.reserved_at > ttl and id(row) not in queued:
                log.warning("cache reservation for %s expired", row.key.hex())
                self._forget(row)
        for name, tier in self.files.items():
            await anyio.to_thread.run_sync(tier.sweep_tmps, ttl)
            await self._forget_vanished(name, tier)
            known = set(self.catalog.lru[name]) | {
                r.key for r in self.catalog.rows.values() if not r.available
            }
            metas, corrupt = await anyio.to_thread.run_sync(tier.scan_unknown, known, ttl)
            self.counters.bump("corrupt_files", corrupt)
            self._adopt_all(name, metas, count=True)
            await self._enforce_budget(name)

    async def _forget_vanished(self, name: str, tier: FileTier) -> None:
        """Forget indexed rows whose file is gone (deleted by another engine sharing the
        directory, say one with a smaller budget, or by an operator), so that the tier's byte
        total stays true and budgets are not enforced against phantom rows."""
        # Only rows already published before the listing: one published while the directory
        # is being listed may be missing from the listing, yet is there.
        before = [r for k in self.catalog.lru[name] if (r := self.catalog.rows[k]).available]
        present = await anyio.to_thread.run_sync(tier.row_keys)
        for row in before:
            if (
                row.key not in present
                and self.catalog.get(row.key) is row
                and row.tier == name
                and not row.pins
                and not row.spilling
            ):
                self._forget(row, "deleted")

    def _adopt_all(self, tier: str, metas: Sequence[RowMeta], *, count: bool) -> None:
        """Index rows found in ``tier``'s files, in eviction order: popular rows survive the
        first LRU walk after a restart (or an adoption), since each recorded hit counts as one
        second of recency on top of the creation time."""
        for meta in sorted(metas, key=lambda m: m.created_ns / 1e9 + m.hits):
            self._adopt(tier, meta, count=count)

    def _adopt(self, tier: str, meta: RowMeta, *, count: bool) -> None:
        existing = self.catalog.get(meta.key)
        if existing is not None:
            return
        row = Row(
            key=meta.key,
            ns_id=meta.ns_id,
            token_bytes=meta.token_bytes,
            tier=tier,
            size=meta.file_size,
            reason=meta.reason,
            status="available",
            hits=meta.hits,
        )
        self.catalog.add(row)
        row.published.set()
        if count:
            self.counters.bump("adopted")

    # ---- moving rows between engines -------------------------------------------------------------

    async def export_row(self, key: bytes) -> bytes | None:
        """One row as a self-validating byte string (the file format: header, metadata with
        the tokens, payload, checksums), for another engine to import; None if not held."""
        row = self.catalog.get(key)
        if row is None:
            return None
        if row.payload is not None:
            prefix = encode_row(_namespace_of(row.ns_id), row.token_bytes, row.reason, row.payload)
            return prefix + bytes(row.payload)
        tier = self.files[row.tier]
        try:
            return await anyio.to_thread.run_sync(
                tier.read_bytes, key, limiter=self.finder.read_limiter
            )
        except OSError:
            return None

    async def import_row(self, data: bytes | bytearray | memoryview) -> bytes:
        """Validate a row another engine exported (exactly as a file read from disk is
        validated) and save it here; returns its key. CacheError if it is damaged."""
        try:
            meta, payload = await anyio.to_thread.run_sync(parse_row, data, None)
        except CorruptRow as exc:
            self.counters.bump("corrupt_files")
            raise CacheError("import", f"the row is damaged: {exc}") from exc
        key = self.save(meta.namespace(), meta.tokens, bytes(payload), meta.reason)
        if key is None:
            raise CacheError("import", "no tier has room for the row")
        self.counters.bump("adopted")
        return key

    # ---- queries and operator calls -------------------------------------------------------------

    def peek_longest(
        self, ns: Namespace, tokens: Sequence[int], policy: CachePolicy
    ) -> tuple[int, str, bytes] | None:
        return self.finder.peek_longest(ns, tokens, policy)

    def probe(self, ns: Namespace, tokens: Sequence[int], *, foreign: bool) -> CacheProbe:
        return probe(self.catalog, ns, tokens, foreign=foreign)

    def rows_of(self, ns: Namespace) -> list[Row]:
        """Every row of one namespace (one model identity), newest first."""
        rows = [r for r in self.catalog.rows.values() if r.ns_id == ns.id]
        rows.sort(key=lambda r: r.last_used, reverse=True)
        return rows

    def reset_counters(self) -> None:
        self.counters.reset()

    def gc(self) -> int:
        """Drop every row that is not being read or written; returns how many."""
        dropped = 0
        for row in list(self.catalog.rows.values()):
            if row.available and not row.pins and not row.spilling:
                self.counters.bump("evictions")
                self._drop(row, "gc")
                dropped += 1
        return dropped

    # ---- pressure ------------------------------------------------------------------------------

    def evict_bytes(self, target: int, tiers: Sequence[str]) -> tuple[int, int]:
        """Free at least ``target`` bytes from ``tiers`` (in that order), least recently used
        first, skipping rows being read or written. Rows are deleted, not spilled: pressure
        means memory is short. Returns (rows, bytes) freed."""
        rows = freed = 0
        for tier in tiers:
            if tier not in self.catalog.lru:
                raise CacheError("evict", f"unknown tier {tier!r}")
            for victim in self.catalog.oldest(tier):
                if freed >= target:
                    return rows, freed
                freed += victim.size
                rows += 1
                self.counters.bump("evictions")
                self._drop(victim, "pressure")
        return rows, freed
