"""Operator calls on one model: evict and save-all, sessions, and routing queries.

Saves are packed on the model thread between steps (a call into it) and handed to the cache
on the loop when the call completes, whether or not its caller still waits. Routing queries
never wait for the thread: they read the cache index and a copy of the live-KV table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from ..cache.key import common_prefix_tokens, encode_tokens, salted
from ..cluster.prefixes import PrefixSummary, chain_hashes
from ..errors import InvalidRequest, ModelNotFound
from ..events import CachedPrefix
from . import intake
from .kv import SaveOrder
from .request import Request
from .scheduler import JobState

if TYPE_CHECKING:
    from .worker import ModelWorker

__all__ = ["Operations"]

log = logging.getLogger("erllama.model")


class Operations:
    def __init__(self, worker: ModelWorker) -> None:
        self.w = worker
        #: Row key -> chain hashes, for prefix summaries.
        self._chains: dict[bytes, list[int]] = {}

    async def evict(self) -> int:
        """Evict-save every admitted sequence now (between steps); returns rows saved."""

        def pack() -> list[tuple[Request, SaveOrder]]:
            sched, kv = self.w.thread.sched, self.w.thread.kv
            assert sched is not None and kv is not None
            out = []
            for job in list(sched.admitted.values()):
                req: Request = job.owner
                if job.state is JobState.RUNNING and req.kv.context and job.seq is not None:
                    order = kv.save(req.kv, job.seq, "evict")
                    if order is not None:
                        out.append((req, order))
            return out

        def store(orders: list[tuple[Request, SaveOrder]]) -> int:
            return sum(1 for req, order in orders if self.w.save(req, order) is not None)

        return await self.w.call(pack, finish=store)

    async def save_all(self) -> int:
        """Save every sequence that holds state now (reason ``evict``): running requests,
        pinned sessions and the live KV of idle sequences. Returns how many sequences'
        states the cache now holds."""

        def pack() -> list[tuple[Request | None, SaveOrder]]:
            sched, kv = self.w.thread.sched, self.w.thread.kv
            assert sched is not None and kv is not None
            out: list[tuple[Request | None, SaveOrder]] = []
            for seq in range(sched.n_seq):
                job = sched.admitted.get(seq)
                order = None
                if job is not None:
                    req: Request = job.owner
                    if job.state is JobState.RUNNING and req.kv.context:
                        order = kv.save(req.kv, seq, "evict")
                        if order is not None:
                            out.append((req, order))
                elif seq in kv.live:
                    order = kv.save_live(seq, "evict")
                    if order is not None:
                        out.append((None, order))
            return out

        def store(orders: list[tuple[Request | None, SaveOrder]]) -> int:
            saved = 0
            for req, order in orders:
                key = self.w.save(req, order) if req is not None else self.w.accept(order)
                saved += key is not None
            return saved

        return await self.w.call(pack, finish=store)

    async def end_session(self, session_id: str) -> None:
        """Release a session's sequence (after an evict save). Idempotent; a session whose
        request is running is released when that request ends."""
        self.w.check_serving()
        session = intake.check_session(session_id)
        if session is None:
            raise InvalidRequest("session_id", "must be a non-empty string")

        def run() -> None:
            self.w.thread.release_session(session)

        await self.w.call(run)

    async def expire_sessions(self) -> None:
        """Forever: release sessions idle longer than ``ModelConfig.session_ttl_s``."""
        ttl = self.w.config.session_ttl_s
        while True:
            await anyio.sleep(min(ttl / 2, 30.0))
            if not self.w.thread.sessions.info or self.w.state != "idle":
                continue

            def expire() -> None:
                for session in self.w.thread.sessions.idle(older_than=ttl):
                    log.info(
                        "model %s: session %r idle for %.0f s; released", self.w.id, session, ttl
                    )
                    self.w.thread.release_session(session)

            with contextlib.suppress(ModelNotFound):
                await self.w.call(expire)

    def cached_prefix(self, tokens: Sequence[int], cache_salt: str | None = None) -> CachedPrefix:
        """How many leading tokens of ``tokens`` a request would not have to prefill, and
        where they would come from: a cache tier, or a sequence's live KV. Only what
        requests with the same ``cache_salt`` left counts."""
        adapters, kv = self.w.thread.adapters, self.w.thread.kv
        assert adapters is not None and kv is not None
        fp = salted(adapters.fingerprint, cache_salt)
        best = CachedPrefix(tokens=0, tier=None)
        if self.w.cache.enabled:
            found = self.w.cache.peek_longest(self.w.namespace(fp), tokens, self.w.policy)
            if found is not None:
                best = CachedPrefix(tokens=found[0], tier=found[1], key=found[2].hex())
        live = dict(kv.live)  # one C-level copy: the thread may change it meanwhile
        if live:
            encoded = encode_tokens(tokens)
            for held, held_fp in live.values():
                if held_fp == fp:
                    n = common_prefix_tokens(held, encoded)
                    if n > best.tokens:
                        best = CachedPrefix(tokens=n, tier="live")
        return best

    def prefix_summary(self, block: int, limit: int) -> PrefixSummary:
        """What this model holds, as chain hashes of whole blocks (``erllama.cluster``): its
        cache rows, oldest first, then its sequences' live KV. A row's chain is computed once
        and remembered by key."""
        summary = PrefixSummary(block=block, limit=limit)
        adapters, kv = self.w.thread.adapters, self.w.thread.kv
        if adapters is None or kv is None:
            return summary
        fp = adapters.fingerprint
        if self.w.cache.enabled:
            seen: dict[bytes, list[int]] = {}
            for row in reversed(self.w.cache.rows_of(self.w.namespace(fp))):
                chain = self._chains.get(row.key)
                if chain is None:
                    chain = chain_hashes(row.token_bytes, block)
                seen[row.key] = chain
                summary.add_chain(chain, row.tier)
            self._chains = seen  # forget rows that are gone
        for held, held_fp in dict(kv.live).values():
            if held_fp == fp:
                summary.add(held, "live")
        return summary

    def cached_prefixes(self) -> list[CachedPrefix]:
        """Every cache row of this model (its current adapter set), newest first."""
        adapters = self.w.thread.adapters
        if not self.w.cache.enabled or adapters is None:
            return []
        return [
            CachedPrefix(tokens=r.n_tokens, tier=r.tier, key=r.key.hex())
            for r in self.w.cache.rows_of(self.w.namespace(adapters.fingerprint))
        ]
