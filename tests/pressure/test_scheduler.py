"""Pressure rounds through the engine on the stub, driven by force_check (asyncio and trio)."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

import erllama
from erllama.backends.stub import StubControl
from erllama.cache.manager import KVCache
from erllama.pressure import TierEviction

from ..helpers import metered, release, stub_config, wait_for
from .conftest import Meter, OpenEngine, fill, forced

pytestmark = pytest.mark.anyio


async def test_disabled_by_default_and_force_check_says_so(open_engine: OpenEngine) -> None:
    async with open_engine() as engine:
        res = await engine.force_check()
        assert res.outcome == "disabled" and res.skipped
        status = engine.pressure_status()
        assert not status.enabled and not status.running
        assert status.rounds == 0 and status.last_sample is None


async def test_below_the_high_watermark_nothing_is_freed(
    open_engine: OpenEngine, meter: Meter
) -> None:
    async with open_engine(forced(meter)) as engine:
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 2)
        meter.aim(84_999)  # high watermark 0.85
        res = await engine.force_check()
        assert res.outcome == "below_watermark"
        assert res.sample is not None and res.sample.ratio == pytest.approx(0.84999)
        assert res.evicted == () and res.unloaded_models == ()
        assert engine.cache_counters().rows_ram == 2
        status = engine.pressure_status()
        assert status.running and status.rounds == 1
        assert status.last_ratio == pytest.approx(0.84999)
        assert status.last_freed is None


async def test_evicts_ram_rows_first_least_recently_used_and_stops_at_the_target(
    open_engine: OpenEngine, meter: Meter
) -> None:
    cfg = forced(meter, high_watermark=0.8, low_watermark=0.799)
    async with open_engine(cfg, ram_bytes=250) as engine:
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 4)
        await wait_for(lambda: engine.cache_counters().rows_ram_file == 2)
        before = engine.cache_counters()
        meter.aim(80_000)  # 100 bytes over the low watermark: one RAM row covers it
        res = await engine.force_check()
        assert res.outcome == "freed" and res.target_bytes == 100
        assert res.evicted == (TierEviction(tier="ram", rows=1, bytes=112),)
        after = engine.cache_counters()
        assert after.rows_ram == before.rows_ram - 1
        assert after.rows_ram_file == before.rows_ram_file
        assert [m.id for m in engine.list_models()] == ["m"]


async def test_then_ram_file_rows_then_idle_models_least_recently_used_first(
    open_engine: OpenEngine, meter: Meter
) -> None:
    meter.per_model = 30_000
    cfg = forced(meter, high_watermark=0.8, low_watermark=0.5)
    async with open_engine(cfg, ram_bytes=250) as engine:
        await engine.load_model("old", stub_config())
        await engine.load_model("new", stub_config())
        await fill(engine, "old", 2)
        await fill(engine, "new", 2, start=10)  # "new" was used last
        await wait_for(lambda: engine.cache_counters().rows_ram_file == 2)
        ram_file = engine.cache_counters().bytes_ram_file
        meter.aim(80_001)
        res = await engine.force_check()
        assert res.outcome == "freed"
        assert res.evicted == (
            TierEviction(tier="ram", rows=2, bytes=224),
            TierEviction(tier="ram_file", rows=2, bytes=ram_file),
        )
        # After the cache, 80_001 - cache bytes is still above 50_000; one unload is enough.
        assert res.unloaded_models == ("old",)
        assert [m.id for m in engine.list_models()] == ["new"]
        assert res.after is not None and res.after.ratio is not None
        assert res.after.ratio <= 0.5
        status = engine.pressure_status()
        assert status.evicted_rows == 4 and status.evicted_bytes == 224 + ram_file
        assert status.unloaded_models == 1
        assert status.last_freed == res and status.last_result == res
        c = engine.cache_counters()
        assert c.rows_ram == c.rows_ram_file == 0


async def test_disk_rows_are_evicted_only_when_disk_is_listed(
    open_engine: OpenEngine, meter: Meter, tmp_path: Path
) -> None:
    cache = {"ram_bytes": 0, "ram_file_dir": None, "disk_dir": tmp_path / "disk"}
    async with open_engine(forced(meter, unload_idle_models=False), **cache) as engine:
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 2)
        await wait_for(lambda: engine.cache_counters().saves_finish == 2)
        meter.aim(90_000)
        assert (await engine.force_check()).outcome == "nothing_to_evict"
        assert engine.cache_counters().rows_disk == 2
    cfg = forced(meter, unload_idle_models=False, evict_tiers=["ram", "ram_file", "disk"])
    async with open_engine(cfg, **cache) as engine:
        assert engine.cache_counters().rows_disk == 2  # found again at start
        meter.aim(90_000)
        res = await engine.force_check()
        assert res.outcome == "freed"
        assert [(t.tier, t.rows) for t in res.evicted] == [("disk", 2)]


async def test_a_busy_model_is_never_unloaded_and_its_requests_complete(
    open_engine: OpenEngine, meter: Meter
) -> None:
    meter.per_model = 30_000
    ctl = metered()
    async with open_engine(forced(meter), enabled=False) as engine:
        await engine.load_model("busy", stub_config(control=ctl))
        await engine.load_model("idle", stub_config())
        running = await engine.infer("busy", "first request", max_tokens=3)
        queued = await engine.infer("busy", "second request", max_tokens=3)
        await wait_for(lambda: ctl.active == 1)
        assert engine.model_info("busy").queue_len == 1
        meter.aim(99_000)
        res = await engine.force_check()
        assert res.outcome == "freed" and res.unloaded_models == ("idle",)
        # Only the busy model is left: above the watermark again, nothing more to free.
        meter.aim(99_000)
        again = await engine.force_check()
        assert again.outcome == "nothing_to_evict"
        assert engine.status("busy") != "unloading"
        release(ctl, 100)
        a = await running.collect()
        b = await queued.collect()
        assert (a.finish_reason, len(a.token_ids)) == ("length", 3)
        assert (b.finish_reason, len(b.token_ids)) == ("length", 3)
        # Once idle it is fair game.
        await wait_for(lambda: engine.status("busy") == "idle")
        meter.aim(99_000)
        assert (await engine.force_check()).unloaded_models == ("busy",)


async def test_a_model_whose_template_renders_off_its_thread_is_not_idle(
    open_engine: OpenEngine, meter: Meter
) -> None:
    """A chat template (or tokenize, or a sampler) running on a worker thread uses the
    model's native handle: a pressure round must not unload the model under it."""
    meter.per_model = 30_000
    ctl = StubControl(native_delay_s=0.5)
    async with open_engine(forced(meter), enabled=False) as engine:
        await engine.load_model("m", stub_config(control=ctl))
        rendered: list[list[int]] = []

        async def render() -> None:
            messages = [{"role": "user", "content": "hello there"}]
            rendered.append(await engine.apply_chat_template("m", messages))

        async with anyio.create_task_group() as tg:
            tg.start_soon(render)
            await anyio.wait_all_tasks_blocked()  # the template is on its worker thread
            meter.aim(99_000)
            res = await engine.force_check()
            assert res.outcome == "nothing_to_evict" and res.unloaded_models == ()
        assert rendered and ctl.use_after_free == 0
        meter.aim(99_000)
        assert (await engine.force_check()).unloaded_models == ("m",)  # idle again


async def test_nothing_to_evict_without_rows_or_idle_models(
    open_engine: OpenEngine, meter: Meter, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_engine(forced(meter)) as engine:
        meter.aim(95_000)
        with caplog.at_level(logging.WARNING, logger="erllama.pressure"):
            res = await engine.force_check()
        assert res.outcome == "nothing_to_evict" and res.target_bytes == 20_000
        assert "nothing to evict" in caplog.text


async def test_models_stay_loaded_when_unloading_is_off(
    open_engine: OpenEngine, meter: Meter
) -> None:
    meter.per_model = 50_000
    async with open_engine(forced(meter, unload_idle_models=False)) as engine:
        await engine.load_model("m", stub_config())
        meter.aim(95_000)
        assert (await engine.force_check()).outcome == "nothing_to_evict"
        assert [m.id for m in engine.list_models()] == ["m"]


async def test_min_evict_bytes_is_a_floor_on_the_target(
    open_engine: OpenEngine, meter: Meter
) -> None:
    cfg = forced(meter, high_watermark=0.8, low_watermark=0.799, min_evict_bytes=300)
    async with open_engine(cfg) as engine:
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 4)
        meter.aim(80_000)
        res = await engine.force_check()
        assert res.target_bytes == 300
        assert res.evicted == (TierEviction(tier="ram", rows=3, bytes=336),)


async def test_with_the_cache_off_it_goes_straight_to_models(
    open_engine: OpenEngine, meter: Meter
) -> None:
    meter.per_model = 40_000
    async with open_engine(forced(meter), enabled=False) as engine:
        await engine.load_model("m", stub_config())
        meter.aim(90_000)
        res = await engine.force_check()
        assert res.evicted == () and res.unloaded_models == ("m",)
        assert engine.list_models() == []


async def test_async_custom_callable(open_engine: OpenEngine) -> None:
    async def reading() -> tuple[int, int]:
        await anyio.lowlevel.checkpoint()  # it does wait for something
        return 3, 4

    cfg = erllama.PressureConfig(enabled=True, source="custom", custom=reading)
    async with open_engine(cfg) as engine:
        res = await engine.force_check()
        assert res.outcome == "below_watermark"
        assert res.sample is not None and res.sample.ratio == 0.75
        assert res.sample.used_bytes == 3 and res.sample.total_bytes == 4


async def test_sync_custom_callable_with_several_devices_follows_the_fullest(
    open_engine: OpenEngine,
) -> None:
    cfg = erllama.PressureConfig(
        enabled=True,
        source="custom",
        custom=lambda: [(10, 100), (95, 100), (0, 100)],
        high_watermark=0.9,
        low_watermark=0.5,
        min_evict_bytes=0,
    )
    async with open_engine(cfg) as engine:
        res = await engine.force_check()
        assert res.sample is not None
        assert res.sample.fullest is not None and res.sample.fullest.name == "custom1"
        assert res.sample.ratio == 0.95 and res.target_bytes == 45


@pytest.mark.parametrize(
    ("reading", "why"),
    [
        (RuntimeError("sensor on fire"), "RuntimeError: sensor on fire"),
        ((120, 100), "exceeds total"),
        ((-1, 100), ">= 0"),
        ((5, 0), "total must be > 0"),
        ("lots", "expected (used_bytes, total_bytes)"),
        (None, "the source returned nothing"),
        ((True, 4), "must be a number of bytes"),
    ],
)
async def test_a_failing_or_bogus_custom_source_is_unavailable_not_a_crash(
    open_engine: OpenEngine,
    caplog: pytest.LogCaptureFixture,
    reading: object,
    why: str,
) -> None:
    def source() -> object:
        if isinstance(reading, Exception):
            raise reading
        return reading

    cfg = erllama.PressureConfig(enabled=True, source="custom", custom=source)
    async with open_engine(cfg) as engine:
        with caplog.at_level(logging.WARNING, logger="erllama.pressure"):
            res = await engine.force_check()
            await engine.force_check()
        assert res.outcome == "unavailable" and res.sample is not None
        assert not res.sample.available and res.sample.ratio is None
        assert res.error is not None and why in res.error
        # One warning when it becomes unavailable, not one per round.
        assert [r.getMessage() for r in caplog.records].count(
            f"pressure source 'custom' unavailable: {res.error}"
        ) == 1
        status = engine.pressure_status()
        assert status.unavailable_samples == 2 and status.rounds == 2
        assert status.last_error == res.error and status.last_ratio is None
        await engine.load_model("m", stub_config())
        assert (await engine.complete("m", "still serving", max_tokens=2)).token_ids


async def test_a_hanging_source_times_out_as_unavailable(open_engine: OpenEngine) -> None:
    async def hang() -> tuple[int, int]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    cfg = erllama.PressureConfig(enabled=True, source="custom", custom=hang, sample_timeout_s=0.05)
    async with open_engine(cfg) as engine:
        res = await engine.force_check()
        assert res.outcome == "unavailable"
        assert res.error == "no reading within 0.05 s"


async def test_an_exception_inside_a_round_is_reported_and_the_engine_lives_on(
    open_engine: OpenEngine, meter: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: KVCache, target: int, tiers: object) -> tuple[int, int]:
        raise RuntimeError("catalog is on fire")

    async with open_engine(forced(meter, unload_idle_models=False)) as engine:
        await engine.load_model("m", stub_config())
        await fill(engine, "m", 1)
        monkeypatch.setattr(KVCache, "evict_bytes", broken)
        meter.aim(99_000)
        res = await engine.force_check()
        assert res.outcome == "failed" and res.error == "RuntimeError: catalog is on fire"
        status = engine.pressure_status()
        assert status.failed_rounds == 1 and status.running
        monkeypatch.undo()
        assert (await engine.force_check()).outcome == "freed"
        assert (await engine.complete("m", "still serving", max_tokens=2)).token_ids


async def test_the_real_psutil_source_through_entry_points(
    registry: erllama.plugins.BackendRegistry,
) -> None:
    # No pressure_sources argument: the source comes from the installed entry point.
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        pressure=erllama.PressureConfig(enabled=True, high_watermark=1.0, low_watermark=0.99),
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        res = await engine.force_check()
        assert res.outcome in ("below_watermark", "nothing_to_evict")
        assert res.sample is not None and res.sample.source == "psutil"
        used, total = res.sample.used_bytes, res.sample.total_bytes
        assert used is not None and total is not None and 0 < used <= total
