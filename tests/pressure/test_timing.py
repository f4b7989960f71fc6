"""The periodic task on trio's virtual clock (pytest-trio's ``autojump_clock``): rounds at
exact interval multiples, no real sleeping.

These run on trio only, through pytest-trio, beside the anyio-driven tests of this package.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

import erllama
from erllama.backends import stub
from erllama.cache.manager import KVCache
from erllama.plugins import BackendRegistry
from erllama.pressure.registry import PressureSourceRegistry

from ..helpers import stub_config
from .conftest import POLICY, Meter, fill


def config(meter: Meter, **pressure: object) -> erllama.EngineConfig:
    fields: dict[str, object] = {
        "enabled": True,
        "source": "custom",
        "custom": meter,
        "interval_s": 5.0,
        "min_evict_bytes": 0,
    }
    fields.update(pressure)
    return erllama.EngineConfig(
        # RAM tier only: no file tier, so no worker threads run while the clock jumps.
        cache=erllama.CacheConfig(ram_file_dir=None, policy=POLICY, sweep_interval_s=3600.0),
        pressure=erllama.PressureConfig(**fields),  # type: ignore[arg-type]
    )


@pytest.fixture
def backends() -> BackendRegistry:
    return erllama.make_backend_registry({"stub": stub}, autoload=False)


@pytest.mark.trio
async def test_rounds_fire_every_interval(
    autojump_clock: trio.testing.MockClock,
    backends: BackendRegistry,
    sources: PressureSourceRegistry,
    meter: Meter,
) -> None:
    async with erllama.open_engine(
        config(meter), backends=backends, pressure_sources=sources
    ) as engine:
        t0 = trio.current_time()
        assert engine.pressure_status().running
        await trio.sleep(16)
        assert [t - t0 for t in meter.calls] == [5.0, 10.0, 15.0]
        status = engine.pressure_status()
        assert status.rounds == 3
        assert status.last_result is not None
        assert status.last_result.outcome == "below_watermark"
        assert status.last_sample is not None and status.last_sample.taken_at == t0 + 15
    assert not engine.pressure_status().running


@pytest.mark.trio
async def test_the_loop_frees_memory_on_its_own_and_counters_move(
    autojump_clock: trio.testing.MockClock,
    backends: BackendRegistry,
    sources: PressureSourceRegistry,
    meter: Meter,
) -> None:
    # Model calls run in worker threads, and the autojump clock would leap ahead while they
    # do (a waiting task counts as idle): hold the clock still around them.
    autojump_clock.autojump_threshold = math.inf
    cfg = config(meter, high_watermark=0.8, low_watermark=0.799, unload_idle_models=False)
    async with erllama.open_engine(cfg, backends=backends, pressure_sources=sources) as engine:
        t0 = trio.current_time()
        meter.engine = engine
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 4)
        autojump_clock.autojump_threshold = 0
        meter.aim(80_000)  # 100 bytes over the low watermark: one 112-byte row covers it
        await trio.sleep(5.5)
        status = engine.pressure_status()
        assert status.rounds == 1
        assert (status.evicted_rows, status.evicted_bytes) == (1, 112)
        assert status.last_freed is not None and status.last_freed.finished_at == t0 + 5
        await trio.sleep(10)
        status = engine.pressure_status()
        # The row it freed took the reading to 79_888, below the high watermark.
        assert status.rounds == 3 and status.evicted_rows == 1
        assert status.last_result is not None
        assert status.last_result.outcome == "below_watermark"
        meter.aim(80_000)
        await trio.sleep(5)
        status = engine.pressure_status()
        assert status.rounds == 4 and status.evicted_rows == 2
        assert status.last_freed is not None and status.last_freed.finished_at == t0 + 20
        assert engine.cache_counters().rows_ram == 2
        autojump_clock.autojump_threshold = math.inf


@pytest.mark.trio
async def test_a_failing_source_or_round_never_stops_the_loop(
    autojump_clock: trio.testing.MockClock,
    backends: BackendRegistry,
    sources: PressureSourceRegistry,
    meter: Meter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = iter([True, False])

    def flaky() -> tuple[int, int]:
        if next(failures, False):
            raise OSError("sensor unplugged")
        return meter()

    def broken(self: KVCache, target: int, tiers: object) -> tuple[int, int]:
        raise RuntimeError("catalog is on fire")

    cfg = config(meter, custom=flaky)
    async with erllama.open_engine(cfg, backends=backends, pressure_sources=sources) as engine:
        meter.aim(99_000)
        monkeypatch.setattr(KVCache, "evict_bytes", broken)
        await trio.sleep(11)
        status = engine.pressure_status()
        assert status.rounds == 2 and status.running
        assert status.unavailable_samples == 1 and status.failed_rounds == 1
        assert status.last_error == "RuntimeError: catalog is on fire"
        monkeypatch.undo()
        await trio.sleep(5)
        status = engine.pressure_status()
        assert status.rounds == 3 and status.failed_rounds == 1
        assert status.last_result is not None
        assert status.last_result.outcome == "nothing_to_evict"


@pytest.mark.trio
async def test_a_slow_round_skips_the_ticks_it_missed(
    autojump_clock: trio.testing.MockClock,
    backends: BackendRegistry,
    sources: PressureSourceRegistry,
    meter: Meter,
) -> None:
    async def reading() -> tuple[int, int]:
        if not meter.calls:  # the first reading takes 12 s
            await trio.sleep(12)
        return meter()

    cfg = config(meter, custom=reading, sample_timeout_s=60.0)
    async with erllama.open_engine(cfg, backends=backends, pressure_sources=sources) as engine:
        t0 = trio.current_time()
        await trio.sleep(26)
        # Round 1 starts at 5 and ends at 17; ticks 10 and 15 are skipped, not burst.
        assert [t - t0 for t in meter.calls] == [17.0, 20.0, 25.0]
        assert engine.pressure_status().rounds == 3


@pytest.mark.trio
async def test_force_check_waits_for_a_round_in_progress(
    autojump_clock: trio.testing.MockClock,
    backends: BackendRegistry,
    sources: PressureSourceRegistry,
    meter: Meter,
) -> None:
    async def reading() -> tuple[int, int]:
        await trio.sleep(2)
        return meter()

    cfg = config(meter, custom=reading)
    async with erllama.open_engine(cfg, backends=backends, pressure_sources=sources) as engine:
        t0 = trio.current_time()
        await trio.sleep(6)  # the periodic round started at 5 and is reading until 7
        res = await engine.force_check()
        assert res.started_at == t0 + 7 and res.finished_at == t0 + 9
        assert engine.pressure_status().rounds == 2
