"""The model lifecycle on the stub: known models load on first use, unload after their
keep-alive or to make room (max_loaded_models), and their cache rows outlive the unload.

Timing is driven, never slept on: keep-alive tests stop the engine's expiry task and give
the lifecycle a clock they move by hand, then run the expiry check themselves
(``engine.expire_models()``). Only the tests of the expiry task itself wait for it, on a
condition with a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama.backends.stub import StubControl
from erllama.plugins import BackendRegistry

from .helpers import cold_run, metered, release, stub_config, unblock_stubs, wait_for, words

pytestmark = pytest.mark.anyio

#: Saves a finish row for every request of at least 4 tokens, and nothing else.
POLICY = erllama.CachePolicy(
    min_tokens=4, cold_min_tokens=10_000, cold_max_tokens=10_000, continued_interval=100_000
)


class Clock:
    """The lifecycle's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def manual(engine: erllama.Engine) -> Clock:
    """Stop the engine's expiry task and give its lifecycle a hand-moved clock: from here
    only ``engine.expire_models()`` unloads a model whose keep-alive ran out."""
    clock = Clock()
    engine._lifecycle.stop()
    engine._lifecycle.clock = clock
    return clock


def state(engine: erllama.Engine, model_id: str) -> erllama.ModelState:
    (found,) = [s for s in engine.model_states() if s.id == model_id]
    return found


def loaded(engine: erllama.Engine) -> list[str]:
    return sorted(m.id for m in engine.list_models())


@asynccontextmanager
async def opened(
    registry: BackendRegistry, models: dict[str, erllama.ModelConfig], **config: Any
) -> AsyncIterator[erllama.Engine]:
    config.setdefault("cache", erllama.CacheConfig(enabled=False, ram_file_dir=None))
    config.setdefault("preload", [])
    cfg = erllama.EngineConfig(models=models, **config)
    async with erllama.open_engine(cfg, backends=registry) as engine:
        try:
            yield engine
        finally:
            unblock_stubs()


def keep(seconds: float | None, **options: Any) -> erllama.ModelConfig:
    return attrs.evolve(stub_config(**options), keep_alive_s=seconds)


# ---- knowing models without loading them ---------------------------------------------------


async def test_known_models_load_on_their_first_use(registry: BackendRegistry) -> None:
    async with opened(registry, {"a": stub_config(), "b": stub_config()}) as engine:
        assert loaded(engine) == []
        assert {s.id: s.state for s in engine.model_states()} == {"a": "unloaded", "b": "unloaded"}
        assert state(engine, "a").info is None
        done = await engine.complete("a", words(6), max_tokens=3)
        assert done.finish_reason == "length"
        assert loaded(engine) == ["a"]
        a = state(engine, "a")
        assert a.state == "loaded" and a.loads == 1 and a.configured
        assert a.info is not None and a.info.id == "a"
        assert a.last_used_at is not None and a.loaded_at is not None
        assert a.expires_at is None  # keep_alive_s None: kept loaded for good
        # Text calls load too; a second use loads nothing again.
        assert await engine.tokenize("b", words(3)) == await engine.tokenize("a", words(3))
        assert loaded(engine) == ["a", "b"] and state(engine, "b").loads == 1
        await engine.complete("a", words(6), max_tokens=3)
        assert state(engine, "a").loads == 1


async def test_preload_names_the_models_loaded_at_open(registry: BackendRegistry) -> None:
    models = {"a": stub_config(), "b": stub_config(), "c": stub_config()}
    async with opened(registry, models, preload=["b"]) as engine:
        assert loaded(engine) == ["b"]
    # Without preload every configured model loads at open, as before.
    cfg = erllama.EngineConfig(
        models=models, cache=erllama.CacheConfig(enabled=False, ram_file_dir=None)
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        assert loaded(engine) == ["a", "b", "c"]


async def test_concurrent_callers_wait_for_one_load(registry: BackendRegistry) -> None:
    control = StubControl(load_gate=threading.Event())
    async with opened(registry, {"a": stub_config(control=control)}) as engine:
        results: list[str] = []

        async def use() -> None:
            results.append((await engine.complete("a", words(4), max_tokens=2)).finish_reason)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(use)
            await wait_for(lambda: control.waiting > 0)  # the one load, parked in the stub
            a = state(engine, "a")
            assert a.state == "loading" and a.holds == 4
            assert [m.status for m in engine.list_models()] == ["loading"]
            control.load_gate.set()  # type: ignore[union-attr]
        assert results == ["length"] * 4
        assert state(engine, "a").loads == 1 and state(engine, "a").holds == 0


async def test_a_bounded_wait_ends_in_model_loading_and_the_load_goes_on(
    registry: BackendRegistry,
) -> None:
    control = StubControl(load_gate=threading.Event())
    async with opened(registry, {"a": stub_config(control=control)}) as engine:
        with pytest.raises(erllama.ModelLoading) as exc:
            await engine.ensure_loaded("a", wait_s=0.05)
        assert exc.value.model_id == "a" and exc.value.reason == "loading"
        assert state(engine, "a").state == "loading" and state(engine, "a").holds == 0
        control.load_gate.set()  # type: ignore[union-attr]
        await wait_for(lambda: state(engine, "a").state == "loaded")
        info = await engine.ensure_loaded("a", wait_s=0.05)
        assert info.id == "a" and state(engine, "a").loads == 1


async def test_a_failed_load_raises_to_every_waiter_and_is_tried_again(
    registry: BackendRegistry,
) -> None:
    control = StubControl(load_gate=threading.Event())
    config = stub_config(control=control, fail_at="load")
    async with opened(registry, {"bad": config, "good": stub_config()}) as engine:
        errors: list[BaseException] = []

        async def use() -> None:
            try:
                await engine.complete("bad", words(4), max_tokens=2)
            except erllama.BackendError as err:
                errors.append(err)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            tg.start_soon(use)
            await wait_for(lambda: control.waiting > 0 and state(engine, "bad").holds == 2)
            control.load_gate.set()  # type: ignore[union-attr]
        assert len(errors) == 2
        assert all(e.operation == "load" and e.backend == "stub" for e in errors)
        bad = state(engine, "bad")
        assert bad.state == "unloaded" and bad.loads == 0
        assert bad.last_error is not None and "injected failure" in bad.last_error
        with pytest.raises(erllama.BackendError):  # tried again, failing again
            await engine.ensure_loaded("bad")
        assert loaded(engine) == []
        assert (await engine.complete("good", words(4), max_tokens=2)).token_ids


async def test_unknown_models_are_not_found(registry: BackendRegistry) -> None:
    async with opened(registry, {"a": stub_config()}) as engine:
        for call in (
            engine.ensure_loaded("nope"),
            engine.complete("nope", "x"),
            engine.tokenize("nope", "x"),
        ):
            with pytest.raises(erllama.ModelNotFound) as exc:
                await call
            assert exc.value.model_id == "nope"
        # Operator calls never load: a known model that is not loaded is not found.
        with pytest.raises(erllama.ModelNotFound):
            await engine.evict("a")
        with pytest.raises(erllama.ModelNotFound):
            engine.model_info("a")
        assert loaded(engine) == []


async def test_register_model_makes_a_model_known_without_loading_it(
    registry: BackendRegistry,
) -> None:
    async with opened(registry, {}) as engine:
        engine.register_model("late", stub_config())
        assert state(engine, "late").state == "unloaded" and loaded(engine) == []
        with pytest.raises(erllama.ModelAlreadyLoaded):
            engine.register_model("late", stub_config())
        with pytest.raises(erllama.ConfigError):
            engine.register_model("odd", erllama.ModelConfig(backend="nonesuch"))
        assert (await engine.complete("late", words(4), max_tokens=2)).token_ids
        # A configured model stays known through an explicit unload; its next use loads it.
        await engine.unload("late")
        assert state(engine, "late").state == "unloaded"
        assert state(engine, "late").unloads == {"unload": 1}
        await engine.complete("late", words(4), max_tokens=2)
        assert state(engine, "late").loads == 2


async def test_a_call_during_the_unload_of_a_configured_model_waits_and_loads_it_again(
    registry: BackendRegistry,
) -> None:
    control = metered()
    async with opened(registry, {"a": stub_config(control=control)}) as engine:
        running = await engine.infer("a", words(4), max_tokens=50)
        await wait_for(lambda: control.waiting > 0)  # its step waits for a permit
        late: list[erllama.Completion] = []

        async def call() -> None:
            late.append(await engine.complete("a", words(4), max_tokens=2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.unload, "a")
            await wait_for(lambda: engine.status("a") == "unloading")  # held by the step
            tg.start_soon(call)
            await wait_for(lambda: state(engine, "a").holds == 1)
            assert late == [] and state(engine, "a").state == "unloading"
            release(control, 1000)
        async with running:
            assert (await running.collect()).finish_reason == "cancelled"
        (done,) = late
        assert done.finish_reason == "length"
        assert state(engine, "a").loads == 2 and state(engine, "a").unloads == {"unload": 1}


async def test_an_explicit_unload_forgets_a_model_load_model_brought_in(
    registry: BackendRegistry,
) -> None:
    async with opened(registry, {}) as engine:
        await engine.load_model("adhoc", stub_config())
        assert not state(engine, "adhoc").configured
        await engine.unload("adhoc")
        assert engine.model_states() == []
        with pytest.raises(erllama.ModelNotFound):
            await engine.complete("adhoc", "x")


# ---- keep-alive -----------------------------------------------------------------------------


async def test_keep_alive_unloads_an_idle_model_after_its_time(
    registry: BackendRegistry,
) -> None:
    async with opened(registry, {"a": keep(10)}) as engine:
        clock = manual(engine)
        await engine.complete("a", words(4), max_tokens=2)
        a = state(engine, "a")
        assert a.keep_alive_s == 10 and a.expires_at == pytest.approx(a.last_used_at + 10)  # type: ignore[operator]
        clock.advance(9.5)
        assert await engine.expire_models() == []
        await engine.complete("a", words(4), max_tokens=2)  # timed from the last use
        clock.advance(9.5)
        assert await engine.expire_models() == []
        clock.advance(1)
        assert await engine.expire_models() == ["a"]
        assert loaded(engine) == [] and state(engine, "a").unloads == {"keep_alive": 1}
        assert state(engine, "a").expires_at is None
        # Its next use loads it again.
        await engine.complete("a", words(4), max_tokens=2)
        assert loaded(engine) == ["a"] and state(engine, "a").loads == 2


async def test_no_keep_alive_keeps_a_model_for_good(registry: BackendRegistry) -> None:
    async with opened(registry, {"a": keep(None), "b": keep(-1)}) as engine:
        clock = manual(engine)
        await engine.complete("a", words(4), max_tokens=2)
        await engine.complete("b", words(4), max_tokens=2)
        assert state(engine, "b").keep_alive_s is None  # negative: for good, as in Ollama
        clock.advance(1e9)
        assert await engine.expire_models() == []
        assert loaded(engine) == ["a", "b"]


async def test_a_use_overrides_the_keep_alive_and_a_plain_use_restores_it(
    registry: BackendRegistry,
) -> None:
    async with opened(registry, {"a": keep(None)}) as engine:
        clock = manual(engine)
        info = await engine.ensure_loaded("a", keep_alive_s=30)
        assert info.id == "a" and state(engine, "a").keep_alive_s == 30
        clock.advance(31)
        assert await engine.expire_models() == ["a"]
        # The engine's own calls change no rule; a hold without one restores the config's.
        await engine.ensure_loaded("a", keep_alive_s=30)
        await engine.complete("a", words(4), max_tokens=2)
        assert state(engine, "a").keep_alive_s == 30
        await engine.ensure_loaded("a")
        assert state(engine, "a").keep_alive_s is None
        clock.advance(1e6)
        assert await engine.expire_models() == []


async def test_keep_alive_zero_unloads_once_idle_never_while_held_or_busy(
    registry: BackendRegistry,
) -> None:
    control = metered()
    async with opened(registry, {"a": keep(0, control=control)}) as engine:
        manual(engine)
        async with engine.hold("a") as info:
            assert info.status == "idle"
            assert await engine.expire_models() == []  # held
            stream = await engine.infer("a", words(4), max_tokens=3)
        assert await engine.expire_models() == []  # its request runs
        release(control, 100)
        async with stream:
            done = await stream.collect()
        assert done.finish_reason == "length"
        assert await engine.expire_models() == ["a"]
        assert loaded(engine) == []


async def test_the_expiry_task_unloads_on_its_own(registry: BackendRegistry) -> None:
    async with opened(registry, {"zero": keep(0), "short": keep(0.05)}) as engine:
        await engine.complete("zero", words(4), max_tokens=2)
        await wait_for(lambda: state(engine, "zero").state == "unloaded")
        await engine.complete("short", words(4), max_tokens=2)
        await wait_for(lambda: state(engine, "short").state == "unloaded")
        assert state(engine, "zero").unloads == state(engine, "short").unloads == {"keep_alive": 1}


async def test_a_model_with_adapters_is_not_unloaded_by_its_keep_alive(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    adapter = tmp_path / "a.lora"
    adapter.write_bytes(b"STUBLORA-keep")
    async with opened(registry, {"a": keep(1)}) as engine:
        clock = manual(engine)
        await engine.ensure_loaded("a")
        handle = await engine.load_adapter("a", str(adapter))
        clock.advance(5)
        assert await engine.expire_models() == []
        await engine.unload_adapter("a", handle)
        clock.advance(5)
        assert await engine.expire_models() == ["a"]


# ---- max_loaded_models -------------------------------------------------------------------------


async def test_max_loaded_models_unloads_the_least_recently_used_idle_model(
    registry: BackendRegistry,
) -> None:
    models = {m: stub_config() for m in ("a", "b", "c")}
    async with opened(registry, models, max_loaded_models=2) as engine:
        manual(engine)  # last uses in the order of the calls below, whatever the real clock
        for m in ("a", "b"):
            engine._lifecycle.clock.advance(1)  # type: ignore[attr-defined]
            await engine.complete(m, words(4), max_tokens=2)
        engine._lifecycle.clock.advance(1)  # type: ignore[attr-defined]
        await engine.complete("a", words(4), max_tokens=2)  # b is now the older one
        engine._lifecycle.clock.advance(1)  # type: ignore[attr-defined]
        await engine.complete("c", words(4), max_tokens=2)
        assert loaded(engine) == ["a", "c"]
        assert state(engine, "b").unloads == {"max_loaded_models": 1}
        await engine.complete("b", words(4), max_tokens=2)
        assert loaded(engine) == ["b", "c"]


async def test_a_load_waits_for_room_while_every_loaded_model_is_busy(
    registry: BackendRegistry,
) -> None:
    control = metered()
    models = {"a": stub_config(control=control), "b": stub_config()}
    async with opened(registry, models, max_loaded_models=1) as engine:
        stream = await engine.infer("a", words(4), max_tokens=3)
        with pytest.raises(erllama.ModelLoading) as exc:
            await engine.ensure_loaded("b", wait_s=0.05)
        assert "max_loaded_models" in exc.value.reason
        # Nobody waits any more: the load gives up and b is unloaded again.
        await wait_for(lambda: state(engine, "b").state == "unloaded")
        got: list[str] = []

        async def use_b() -> None:
            got.append((await engine.complete("b", words(4), max_tokens=2)).finish_reason)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use_b)
            await wait_for(lambda: state(engine, "b").holds == 1)
            assert state(engine, "b").state == "loading" and loaded(engine) == ["a"]
            release(control, 100)
            async with stream:
                assert (await stream.collect()).finish_reason == "length"
        assert got == ["length"]
        assert loaded(engine) == ["b"] and state(engine, "a").unloads == {"max_loaded_models": 1}


async def test_a_held_model_is_not_unloaded_to_make_room(registry: BackendRegistry) -> None:
    models = {"a": stub_config(), "b": stub_config()}
    async with opened(registry, models, max_loaded_models=1) as engine:
        async with engine.hold("a"):
            with pytest.raises(erllama.ModelLoading):
                await engine.ensure_loaded("b", wait_s=0.05)
            assert loaded(engine) == ["a"]
        await engine.ensure_loaded("b", wait_s=5)
        assert loaded(engine) == ["b"]


async def test_an_explicit_load_makes_room_too(registry: BackendRegistry) -> None:
    async with opened(registry, {"a": stub_config()}, max_loaded_models=1) as engine:
        await engine.ensure_loaded("a")
        await engine.load_model("extra", stub_config())
        assert loaded(engine) == ["extra"]
        assert state(engine, "a").state == "unloaded"


# ---- cache rows outlive the weights ----------------------------------------------------------


async def test_the_first_request_after_a_reload_restores_from_the_cache(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    cache = erllama.CacheConfig(
        ram_file_dir=tmp_path / "shm",
        disk_dir=tmp_path / "disk",
        policy=POLICY,
        sweep_interval_s=3600.0,
    )
    models = {m: stub_config(keep_live_kv=False) for m in ("a", "b")}
    async with opened(registry, models, cache=cache, max_loaded_models=1) as engine:
        history = {m: words(24, start=100 * i) for i, m in enumerate(("a", "b"))}
        last = {m: await engine.complete(m, history[m], max_tokens=4) for m in ("a", "b")}
        assert all(done.cache_hit_kind == "cold" for done in last.values())
        for turn in range(3):
            for m in ("a", "b"):
                assert loaded(engine) != [m]  # every turn begins with a reload
                history[m] += " " + words(3, start=900 + 10 * turn)
                done = await engine.complete(m, history[m], max_tokens=4)
                before = last[m]
                prompt = done.context_tokens[: done.stats.prompt_tokens]
                # The previous turn's finish row: its prompt and all but the last token of
                # its answer; what the new prompt shares with it is restored, not prefilled.
                shared = _common(prompt, before.context_tokens)
                assert shared >= before.stats.prompt_tokens
                assert done.cache_hit_kind == "partial", (turn, m)
                assert done.stats.cache_delta.read == shared, (turn, m)
                cold = await cold_run(registry, history[m], max_tokens=4)
                assert done.token_ids == cold.token_ids
                last[m] = done
        assert state(engine, "a").loads == 4 and state(engine, "b").loads == 4
        assert state(engine, "a").unloads == {"max_loaded_models": 4}


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- configuration -----------------------------------------------------------------------------


def test_lifecycle_settings_are_checked() -> None:
    assert erllama.ModelConfig(keep_alive_s=-1).keep_alive_s is None
    assert erllama.ModelConfig(keep_alive_s=float("inf")).keep_alive_s is None
    assert erllama.ModelConfig(keep_alive_s=0).keep_alive_s == 0
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.load_config({"models": {"a": {"keep_alive_s": "5m"}}})
    assert exc.value.paths == ["models.a.keep_alive_s"]
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.ModelConfig(keep_alive_s=float("nan"))
    assert exc.value.paths == ["keep_alive_s"]
    models = {"a": stub_config(), "b": stub_config()}
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.EngineConfig(models=models, preload=["a", "c"])
    assert exc.value.paths == ["preload"] and "'c'" in str(exc.value)
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.EngineConfig(models=models, max_loaded_models=1)  # both preloaded
    assert exc.value.paths == ["preload"]
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.EngineConfig(max_loaded_models=0)
    assert exc.value.paths == ["max_loaded_models"]
    ok = erllama.load_config(
        {"models": {"a": {"backend": "stub"}}, "preload": [], "max_loaded_models": 1}
    )
    assert ok.preload == () and ok.max_loaded_models == 1


async def test_a_load_runs_a_pressure_round_first(registry: BackendRegistry) -> None:
    from erllama.pressure import custom

    sources = erllama.make_pressure_registry({"custom": custom}, autoload=False)
    reading = {"used": 10}
    pressure = erllama.PressureConfig(
        enabled=True,
        source="custom",
        custom=lambda: (reading["used"], 100),
        interval_s=3600.0,  # no periodic round in this test: only the one before a load
        evict_tiers=(),
        high_watermark=0.9,
        low_watermark=0.5,
    )
    cfg = erllama.EngineConfig(
        models={"a": stub_config(), "b": stub_config()},
        preload=["a"],
        pressure=pressure,
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
    )
    async with erllama.open_engine(cfg, backends=registry, pressure_sources=sources) as engine:
        await engine.ensure_loaded("b")  # below the watermark: a stays
        assert loaded(engine) == ["a", "b"]
        await engine.unload("b")
        reading["used"] = 95
        await engine.ensure_loaded("b")  # the round before the load unloads idle a
        assert loaded(engine) == ["b"]
        assert state(engine, "a").unloads == {"pressure": 1}
        assert engine.pressure_status().unloaded_models == 1
        reading["used"] = 10
        assert (await engine.complete("a", words(4), max_tokens=2)).token_ids  # known still
