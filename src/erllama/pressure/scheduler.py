"""The memory-pressure scheduler: sample a source, and above the high watermark free memory
down to the low one.

A round, periodic or forced, does this:

1. Sample the source. Unavailable: skip (``unavailable``). Fullest device below the high
   watermark: skip (``below_watermark``).
2. Target: the bytes above the low watermark (on the device that needs the most), at least
   ``min_evict_bytes``.
3. Evict cache rows, least recently used first, tier by tier in ``evict_tiers`` order
   (default RAM, then ram_file), until the target is met. The cache's own byte count is
   trusted here: freed heap or tmpfs pages do not always show in the next reading at once,
   and re-sampling too early would unload a model for memory that is already free.
4. Only if the cache could not cover the target and ``unload_idle_models``: sample again,
   and while still above the low watermark unload idle models, least recently used first,
   sampling after each unload. A model is idle when nothing of it runs, is queued or is
   being admitted, checked at the moment of unloading; each is evict-saved first, then
   unloaded through the engine's normal path.
5. Nothing evictable and no idle model: ``nothing_to_evict``.

A round never raises into the engine: an exception is logged, counted and reported as a
``failed`` round, and the periodic task carries on. Rounds never overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from ..config import PressureConfig
from ..errors import ErllamaError
from .registry import SourcePlugin
from .types import (
    PressureOutcome,
    PressureResult,
    PressureSample,
    PressureStatus,
    TierEviction,
)

__all__ = ["CachePool", "ModelPool", "PressureScheduler", "unload_if_idle"]

log = logging.getLogger("erllama.pressure")


class CachePool(Protocol):
    """What the scheduler needs from the KV cache."""

    def evict_bytes(self, target: int, tiers: Sequence[str]) -> tuple[int, int]:
        """Delete at least ``target`` bytes of rows from ``tiers`` (LRU first); returns
        (rows, bytes) deleted."""
        ...


class ModelPool(Protocol):
    """What the scheduler may do to loaded models (the engine provides it)."""

    def unload_candidates(self) -> list[str]:
        """Ids of idle models, least recently used first."""
        ...

    def is_idle(self, model_id: str) -> bool:
        """True when nothing of the model runs, is queued or is being admitted right now."""
        ...

    async def evict(self, model_id: str) -> int:
        """Evict-save the model's in-flight sequences."""
        ...

    async def unload(self, model_id: str) -> None:
        """Unload through the engine's normal path."""
        ...


async def unload_if_idle(models: ModelPool, model_id: str, why: str) -> bool:
    """Evict-save an idle model, then unload it if it is still idle; True when it was
    unloaded. The pressure scheduler and the engine's model lifecycle (keep-alive expiry,
    ``max_loaded_models``) both unload this way; ``why`` names the caller in the log.

    A request may arrive while the save runs: the second idle check and the start of the
    unload happen with no await between them, so none can slip in after it. A save or an
    unload that fails (the model went away, calls still used it) is logged and gives
    False; the model serves on."""
    if not models.is_idle(model_id):
        return False
    try:
        await models.evict(model_id)
    except ErllamaError as exc:
        log.warning("%s: not unloading %s: evict save failed: %s", why, model_id, exc)
        return False
    if not models.is_idle(model_id):
        log.info("%s: not unloading %s: it became busy", why, model_id)
        return False
    try:
        await models.unload(model_id)
    except ErllamaError as exc:
        log.warning("%s: unloading %s failed: %s", why, model_id, exc)
        return False
    log.info("%s: unloaded idle model %s", why, model_id)
    return True


class PressureScheduler:
    """Runs pressure rounds for one engine. Built by ``open_engine``; not public."""

    def __init__(
        self,
        config: PressureConfig,
        source: SourcePlugin | None,
        *,
        cache: CachePool | None,
        models: ModelPool,
    ) -> None:
        self.config = config
        self._source = source
        self._cache = cache
        self._models = models
        self._lock = anyio.Lock()
        self._scope: anyio.CancelScope | None = None
        self._running = False
        self._stopped = False
        self._last_sample: PressureSample | None = None
        self._last_result: PressureResult | None = None
        self._last_freed: PressureResult | None = None
        self._rounds = 0
        self._evicted_rows = 0
        self._evicted_bytes = 0
        self._unloaded = 0
        self._unavailable = 0
        self._failed = 0
        self._last_error: str | None = None
        #: Warn once when pressure meets nothing to evict, not every interval it persists.
        self._warned_stuck = False

    # ---- the periodic task ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run a round every ``interval_s`` until :meth:`stop`. Deadlines are fixed on the
        clock (no drift); a round that overruns its interval skips the ticks it missed."""
        if not self.config.enabled or self._source is None or self._stopped:
            task_status.started()
            return
        interval = self.config.interval_s
        with anyio.CancelScope() as scope:
            self._scope = scope
            self._running = True
            task_status.started()
            try:
                deadline = anyio.current_time() + interval
                while True:
                    await anyio.sleep_until(deadline)
                    await self.check()
                    deadline += interval
                    now = anyio.current_time()
                    if deadline <= now:
                        deadline += ((now - deadline) // interval + 1) * interval
            finally:
                self._running = False

    def stop(self) -> None:
        """Stop the periodic task (a round in progress is cancelled between steps)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    # ---- rounds ------------------------------------------------------------------------------

    async def check(self) -> PressureResult:
        """Run one round now (after any round in progress) and say what it did. A stopped
        scheduler (the engine is closing) reports ``disabled``."""
        if not self.config.enabled or self._source is None or self._stopped:
            now = anyio.current_time()
            return PressureResult(outcome="disabled", started_at=now, finished_at=now)
        async with self._lock:
            started = anyio.current_time()
            try:
                result = await self._round(started)
            except Exception as exc:
                log.exception("pressure round failed")
                self._failed += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                result = PressureResult(
                    outcome="failed",
                    sample=self._last_sample,
                    started_at=started,
                    finished_at=anyio.current_time(),
                    error=self._last_error,
                )
            self._rounds += 1
            self._last_result = result
            if result.outcome != "nothing_to_evict":
                self._warned_stuck = False
            if result.outcome == "freed":
                self._last_freed = result
            return result

    async def _sample(self) -> PressureSample:
        assert self._source is not None
        sample = await self._source.sample(self.config)
        self._last_sample = sample
        if not sample.available:
            self._unavailable += 1
            self._last_error = sample.error
        return sample

    async def _round(self, started: float) -> PressureResult:
        cfg = self.config
        sample = await self._sample()

        def done(
            outcome: PressureOutcome,
            after: PressureSample,
            *,
            target: int = 0,
            evicted: Sequence[TierEviction] = (),
            unloaded: Sequence[str] = (),
        ) -> PressureResult:
            return PressureResult(
                outcome=outcome,
                sample=sample,
                after=after,
                target_bytes=target,
                evicted=tuple(evicted),
                unloaded_models=tuple(unloaded),
                started_at=started,
                finished_at=anyio.current_time(),
                error=after.error,
            )

        if not sample.available:
            return done("unavailable", sample)
        ratio = sample.ratio
        assert ratio is not None
        if ratio < cfg.high_watermark:
            return done("below_watermark", sample)
        target = max(sample.excess_over(cfg.low_watermark), cfg.min_evict_bytes)
        log.info(
            "memory pressure: %s at %.1f%% (high watermark %.1f%%); freeing %d bytes",
            sample.fullest.name if sample.fullest else "?",
            ratio * 100,
            cfg.high_watermark * 100,
            target,
        )
        evicted = self._evict_cache(target)
        remaining = target - sum(t.bytes for t in evicted)
        after = sample
        unloaded: list[str] = []
        if remaining > 0 and cfg.unload_idle_models and self._models.unload_candidates():
            after, unloaded = await self._unload_idle()
        if evicted or unloaded:
            return done("freed", after, target=target, evicted=evicted, unloaded=unloaded)
        if not after.available:
            return done("unavailable", after, target=target)
        log.log(
            logging.DEBUG if self._warned_stuck else logging.WARNING,
            "memory pressure (%.1f%% used) but nothing to evict: no cache rows in %s "
            "and no idle model",
            ratio * 100,
            list(cfg.evict_tiers),
        )
        self._warned_stuck = True
        return done("nothing_to_evict", after, target=target)

    def _evict_cache(self, target: int) -> list[TierEviction]:
        if self._cache is None:
            return []
        evicted: list[TierEviction] = []
        remaining = target
        for tier in self.config.evict_tiers:
            if remaining <= 0:
                break
            rows, freed = self._cache.evict_bytes(remaining, [tier])
            if rows:
                evicted.append(TierEviction(tier=tier, rows=rows, bytes=freed))
                self._evicted_rows += rows
                self._evicted_bytes += freed
                remaining -= freed
                log.info("pressure: evicted %d rows (%d bytes) from %s", rows, freed, tier)
        return evicted

    async def _unload_idle(self) -> tuple[PressureSample, list[str]]:
        """Unload idle models, LRU first, until a fresh reading is at or below the low
        watermark. Stops when a reading is unavailable: no reading, no unloading."""
        unloaded: list[str] = []
        tried: set[str] = set()
        sample = await self._sample()
        while sample.available and (sample.ratio or 0.0) > self.config.low_watermark:
            victim = next((m for m in self._models.unload_candidates() if m not in tried), None)
            if victim is None:
                break
            tried.add(victim)
            if await self._unload_one(victim):
                unloaded.append(victim)
                sample = await self._sample()
        return sample, unloaded

    async def _unload_one(self, model_id: str) -> bool:
        if not await unload_if_idle(self._models, model_id, "pressure"):
            return False
        self._unloaded += 1
        return True

    # ---- status --------------------------------------------------------------------------------

    def status(self) -> PressureStatus:
        cfg = self.config
        return PressureStatus(
            enabled=cfg.enabled,
            running=self._running,
            source=cfg.source,
            interval_s=cfg.interval_s,
            high_watermark=cfg.high_watermark,
            low_watermark=cfg.low_watermark,
            min_evict_bytes=cfg.min_evict_bytes,
            evict_tiers=tuple(cfg.evict_tiers),
            unload_idle_models=cfg.unload_idle_models,
            last_sample=self._last_sample,
            last_result=self._last_result,
            last_freed=self._last_freed,
            rounds=self._rounds,
            evicted_rows=self._evicted_rows,
            evicted_bytes=self._evicted_bytes,
            unloaded_models=self._unloaded,
            unavailable_samples=self._unavailable,
            failed_rounds=self._failed,
            last_error=self._last_error,
        )
