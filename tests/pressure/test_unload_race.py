"""The scheduler's model-unloading rules against a scripted model pool (no engine)."""

from __future__ import annotations

import attrs
import pytest

import erllama
from erllama.errors import ModelNotFound
from erllama.pressure import hookimpl
from erllama.pressure.scheduler import PressureScheduler

pytestmark = pytest.mark.anyio


@attrs.define
class Pool:
    """Models ``a`` (least recently used) and ``b``; each unload frees 30 of 100 units."""

    loaded: list[str] = attrs.Factory(lambda: ["a", "b"])
    busy: set[str] = attrs.Factory(set)
    #: Models that get a request while their evict save runs.
    busy_after_evict: set[str] = attrs.Factory(set)
    log: list[str] = attrs.Factory(list)

    def unload_candidates(self) -> list[str]:
        return [m for m in self.loaded if m not in self.busy]

    def is_idle(self, model_id: str) -> bool:
        return model_id in self.loaded and model_id not in self.busy

    async def evict(self, model_id: str) -> int:
        self.log.append(f"evict {model_id}")
        if model_id in self.busy_after_evict:
            self.busy.add(model_id)
        return 0

    async def unload(self, model_id: str) -> None:
        if model_id not in self.loaded:
            raise ModelNotFound(model_id)
        self.log.append(f"unload {model_id}")
        self.loaded.remove(model_id)


def scheduler(pool: Pool) -> PressureScheduler:
    class Source:
        @hookimpl
        def sample(self, config: erllama.PressureConfig) -> tuple[int, int]:
            return 40 + 30 * len(pool.loaded), 100

    registry = erllama.make_pressure_registry({"pool": Source}, autoload=False)
    cfg = erllama.PressureConfig(
        enabled=True, source="pool", high_watermark=0.9, low_watermark=0.2, min_evict_bytes=0
    )
    return PressureScheduler(cfg, registry.get("pool"), cache=None, models=pool)


async def test_each_model_is_evict_saved_then_unloaded_lru_first() -> None:
    pool = Pool()
    res = await scheduler(pool).check()
    assert pool.log == ["evict a", "unload a", "evict b", "unload b"]
    assert res.unloaded_models == ("a", "b")
    assert res.after is not None and res.after.ratio == 0.4


async def test_a_model_that_gets_a_request_during_its_evict_save_stays() -> None:
    pool = Pool(busy_after_evict={"a"})
    res = await scheduler(pool).check()
    assert pool.log == ["evict a", "evict b", "unload b"]
    assert res.unloaded_models == ("b",) and pool.loaded == ["a"]


async def test_a_busy_model_is_not_even_evict_saved() -> None:
    pool = Pool(busy={"a", "b"})
    res = await scheduler(pool).check()
    assert res.outcome == "nothing_to_evict" and pool.log == []
