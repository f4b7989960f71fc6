"""Backend failures stay inside their model; leaving the engine ends everything promptly."""

from __future__ import annotations

import threading

import anyio
import pytest

import erllama
from erllama import Done, Token
from erllama.backends.stub import StubControl

from .helpers import metered, release, stub_config, wait_for

pytestmark = pytest.mark.anyio


async def test_failure_at_load_raises_backend_error_and_registers_nothing(
    engine: erllama.Engine,
) -> None:
    good = await engine.load_model("good", stub_config())
    with pytest.raises(erllama.BackendError) as exc:
        await engine.load_model("bad", stub_config(fail_at="load"))
    assert isinstance(exc.value.__cause__, RuntimeError)
    assert exc.value.backend == "stub" and exc.value.operation == "load"
    assert [i.id for i in engine.list_models()] == [good]
    with pytest.raises(erllama.ModelNotFound):
        engine.status("bad")
    # The id is free again and the engine still serves.
    assert await engine.load_model("bad", stub_config()) == "bad"
    assert (await engine.complete(good, "still fine", max_tokens=2)).token_ids


async def test_failure_at_step_fails_that_models_requests_only(engine: erllama.Engine) -> None:
    ctl = metered()
    bad = await engine.load_model("bad", stub_config(control=ctl, fail_at="step", fail_step=3))
    good = await engine.load_model("good", stub_config())
    running = await engine.infer(bad, "first", max_tokens=10)
    queued = await engine.infer(bad, "second", max_tokens=10)
    release(ctl, 100)
    got: list[Token] = []
    with pytest.raises(erllama.BackendError) as exc:
        async for ev in running:
            assert isinstance(ev, Token)
            got.append(ev)
    assert len(got) == 1  # step 1 prefilled, step 2 sampled, step 3 failed
    assert isinstance(exc.value.__cause__, RuntimeError)
    assert "injected failure" in str(exc.value.__cause__)
    with pytest.raises(erllama.BackendError):
        async for _ in queued:
            pass
    assert engine.status(bad) == "failed"
    assert engine.model_info(bad).error == str(exc.value)
    assert str(exc.value).endswith("RuntimeError: stub: injected failure at step 3")
    with pytest.raises(erllama.ModelFailed) as failed:
        await engine.infer(bad, "again")
    assert failed.value.model_id == bad
    assert (await engine.complete(good, "unaffected", max_tokens=3)).finish_reason == "length"
    await engine.unload(bad)
    assert [i.id for i in engine.list_models()] == [good]


async def test_unknown_model_ids_raise_model_not_found(engine: erllama.Engine) -> None:
    for call in (
        lambda: engine.status("nope"),
        lambda: engine.model_info("nope"),
    ):
        with pytest.raises(erllama.ModelNotFound):
            call()
    for acall in (
        lambda: engine.complete("nope", "x"),
        lambda: engine.unload("nope"),
        lambda: engine.tokenize("nope", "x"),
        lambda: engine.evict("nope"),
    ):
        with pytest.raises(erllama.ModelNotFound) as exc:
            await acall()
        assert exc.value.model_id == "nope"


async def test_load_model_refuses_a_taken_id_and_generates_ids(engine: erllama.Engine) -> None:
    await engine.load_model("same", stub_config())
    with pytest.raises(erllama.ModelAlreadyLoaded):
        await engine.load_model("same", stub_config())
    auto = await engine.load_model(None, stub_config())
    assert auto != "same" and engine.status(auto) == "idle"
    await engine.unload_model(auto)
    with pytest.raises(erllama.ModelNotFound):
        engine.status(auto)


async def test_unknown_backend_is_a_config_error(engine: erllama.Engine) -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        await engine.load_model("x", erllama.ModelConfig(backend="nonesuch"))
    assert exc.value.paths == ["backend"]


async def test_leaving_the_engine_ends_every_stream_promptly(
    registry: erllama.plugins.BackendRegistry, no_cache: erllama.EngineConfig
) -> None:
    ctl = StubControl(step_delay_s=0.001)
    streams: list[erllama.InferStream] = []
    with anyio.fail_after(10):
        async with erllama.open_engine(no_cache, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2))
            for i in range(5):
                streams.append(await engine.infer(mid, f"request {i}", max_tokens=100_000))
            await wait_for(lambda: ctl.steps > 3)
    assert ctl.active == 0  # no native step left running
    assert ctl.model is not None and ctl.model.freed
    assert ctl.use_after_free == 0
    for s in streams:
        events = [ev async for ev in s]
        assert isinstance(events[-1], Done)
        assert events[-1].finish_reason == "cancelled"


async def test_engine_exit_with_a_blocked_step_waits_for_it_then_cleans_up(
    registry: erllama.plugins.BackendRegistry, no_cache: erllama.EngineConfig
) -> None:
    gate = threading.Event()
    ctl = StubControl(gate=gate)
    async with erllama.open_engine(no_cache, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config(control=ctl))
        stream = await engine.infer(mid, "x", max_tokens=5)
        await wait_for(lambda: ctl.waiting == 1)
        # Native calls are never abandoned mid-flight (the state would tear): release it.
        threading.Timer(0.05, gate.set).start()
    events = [ev async for ev in stream]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert ctl.active == 0


async def test_user_exceptions_pass_through_the_engine_unwrapped(
    registry: erllama.plugins.BackendRegistry, no_cache: erllama.EngineConfig
) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with erllama.open_engine(no_cache, backends=registry) as engine:
            await engine.load_model("m", stub_config())
            raise KeyError("mine")


async def test_models_from_the_engine_config_are_loaded_at_open(
    registry: erllama.plugins.BackendRegistry,
) -> None:
    config = erllama.EngineConfig(
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        models={"a": stub_config(), "b": stub_config()},
    )
    async with erllama.open_engine(config, backends=registry) as engine:
        assert sorted(i.id for i in engine.list_models()) == ["a", "b"]
