"""The model thread as users see it: structured, never starving, and leaving nothing behind."""

from __future__ import annotations

import gc
import threading

import anyio
import pytest

import erllama
from erllama import Done, Token
from erllama.backends import Decode, Prefill
from erllama.backends.stub import StubControl

from .helpers import metered, release, stub_config, wait_for

pytestmark = pytest.mark.anyio


def model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("erllama-model-")]


async def test_each_model_has_one_named_thread_and_none_outlives_the_engine(
    registry: erllama.plugins.BackendRegistry, no_cache: erllama.EngineConfig
) -> None:
    assert model_threads() == []
    async with erllama.open_engine(no_cache, backends=registry) as engine:
        for name in ("a", "b", "c"):
            await engine.load_model(name, stub_config(step_delay_s=0.002, n_ctx=4096))
        assert sorted(t.name for t in model_threads()) == [
            "erllama-model-a",
            "erllama-model-b",
            "erllama-model-c",
        ]
        await engine.unload("b")
        assert sorted(t.name for t in model_threads()) == ["erllama-model-a", "erllama-model-c"]
        failed = await engine.load_model("f", stub_config(fail_at="step"))
        with pytest.raises(erllama.BackendError):
            await engine.complete(failed, "boom", max_tokens=2)
        # A failed model's thread has freed the model and ended; the model stays listed.
        await wait_for(lambda: "erllama-model-f" not in {t.name for t in model_threads()})
        assert engine.status(failed) == "failed"
        stream = await engine.infer("a", "still going", max_tokens=1_000_000)
        await wait_for(lambda: engine.status("a") == "generating")
    assert model_threads() == []
    events = [ev async for ev in stream]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"


async def test_a_failed_load_leaves_no_thread(engine: erllama.Engine) -> None:
    with pytest.raises(erllama.BackendError):
        await engine.load_model("bad", stub_config(fail_at="load"))
    await wait_for(lambda: model_threads() == [])


async def test_n_batch_below_n_seq_max_is_a_config_error_naming_n_batch() -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.ModelConfig(backend="stub", n_seq_max=8, n_batch=4)
    assert exc.value.paths == ["n_batch"]


async def test_the_default_prefill_chunk_is_64_on_the_cpu_and_a_quarter_batch_on_a_gpu() -> None:
    assert erllama.ModelConfig(n_batch=512).effective_prefill_chunk == 64
    assert erllama.ModelConfig(n_batch=32).effective_prefill_chunk == 32
    assert erllama.ModelConfig(n_batch=2048, n_gpu_layers=-1).effective_prefill_chunk == 512
    assert erllama.ModelConfig(n_batch=128, n_gpu_layers=10).effective_prefill_chunk == 64
    assert erllama.ModelConfig(n_batch=512, prefill_chunk=300).effective_prefill_chunk == 300


async def test_a_long_prompt_never_starves_a_decoding_request(engine: erllama.Engine) -> None:
    ctl = StubControl(step_delay_s=0.002)  # the short request decodes for ~80 ms
    mid = await engine.load_model(
        "m", stub_config(control=ctl, n_seq_max=2, n_ctx=2048, prefill_chunk=64)
    )
    decoding = await engine.infer(mid, "short one", max_tokens=40)
    await anext(decoding)  # it is decoding now
    long_prompt = list(range(300, 300 + 500))
    long = await engine.infer(mid, long_prompt, max_tokens=2)
    tokens = [ev async for ev in decoding if isinstance(ev, Token)]
    await long.collect()
    assert len(tokens) == 39
    # Every step that fed the long prompt also decoded the short request's next token.
    feeding = [
        ops
        for ops in ctl.history
        if any(isinstance(op, Prefill) and op.tokens[0] >= 300 for op in ops)
    ]
    assert len(feeding) == -(-500 // 64)
    for ops in feeding:
        assert any(isinstance(op, Decode) for op in ops)
        assert max(len(op.tokens) for op in ops if isinstance(op, Prefill)) <= 64


async def test_a_short_request_is_not_held_behind_a_long_prefill(engine: erllama.Engine) -> None:
    ctl = StubControl(step_delay_s=0.005)  # the long prefill takes ~32 steps, ~0.2 s
    mid = await engine.load_model(
        "m", stub_config(control=ctl, n_seq_max=2, n_ctx=4096, prefill_chunk=64)
    )
    long = await engine.infer(mid, list(range(300, 300 + 2000)), max_tokens=1)
    await wait_for(lambda: ctl.steps >= 2)
    short = await engine.infer(mid, "a short question", max_tokens=1)
    started = ctl.steps
    first = await anext(short)
    assert isinstance(first, Token)
    # Admitted at the next step, prefilled whole in it, sampled in the one after.
    assert ctl.steps - started <= 3
    assert engine.status(mid) == "prefilling"  # the long prompt is still far from done
    await long.collect()


def record_cancels(engine: erllama.Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refs that reach ``engine.cancel`` from now on (a dropped stream's cancel arrives
    through the model's hand-off, later than the drop)."""
    seen: list[str] = []
    cancel = engine.cancel

    def recording(ref: str) -> None:
        seen.append(ref)
        cancel(ref)

    monkeypatch.setattr(engine, "cancel", recording)
    return seen


async def test_leaving_an_async_for_early_cancels_the_request_within_a_step(
    engine: erllama.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    cancelled = record_cancels(engine, monkeypatch)
    stream = await engine.infer(mid, "keep talking", max_tokens=1000)
    release(ctl, 3)
    async for ev in stream:
        assert isinstance(ev, Token)
        break
    await wait_for(lambda: cancelled == [stream.ref])
    steps = ctl.steps
    release(ctl, 1000)
    await wait_for(lambda: engine.status(mid) == "idle")
    assert ctl.steps - steps <= 1  # at most the step that was under way
    rest = []
    while True:
        try:
            rest.append(await stream.receive())
        except StopAsyncIteration:
            break
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"


async def test_a_stream_dropped_unread_cancels_its_request(
    engine: erllama.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    cancelled = record_cancels(engine, monkeypatch)
    stream = await engine.infer(mid, "nobody listens", max_tokens=1000)
    ref = stream.ref
    release(ctl, 2)
    await wait_for(lambda: ctl.steps == 3 and ctl.waiting == 1)
    del stream
    gc.collect()
    await wait_for(lambda: cancelled == [ref])
    release(ctl, 1000)
    await wait_for(lambda: engine.status(mid) == "idle")
    assert ctl.steps == 3  # the parked step finished, and no other ran


async def test_a_request_whose_sampler_fails_ends_alone_and_the_model_serves_on(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config(n_seq_max=2, fail_at="sample", fail_seed=13))
    good = await engine.infer(mid, "a good request", max_tokens=20, temperature=0.5, seed=1)
    bad = await engine.infer(mid, "a doomed request", max_tokens=20, temperature=0.5, seed=13)
    with pytest.raises(erllama.BackendError) as exc:
        await bad.collect()
    assert isinstance(exc.value.__cause__, OverflowError)
    assert (await good.collect()).finish_reason == "length"
    assert engine.status(mid) == "idle"
    again = await engine.complete(mid, "and after", max_tokens=3, temperature=0.5, seed=2)
    assert again.finish_reason == "length"


async def test_a_control_call_cancelled_before_it_runs_never_runs(
    engine: erllama.Engine, tmp_path: pytest.TempPathFactory
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    adapter = tmp_path / "a.lora"  # type: ignore[operator]
    adapter.write_bytes(b"STUBLORA one")
    running = await engine.infer(mid, "hold the model", max_tokens=4)
    await wait_for(lambda: ctl.waiting == 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.load_adapter, mid, str(adapter))  # waits behind the request
        await wait_for(lambda: engine.model_info(mid).pending_changes == 1)
        tg.cancel_scope.cancel()
    assert engine.model_info(mid).pending_changes == 0  # withdrawn from the queue
    release(ctl, 100)
    await running.collect()
    assert engine.list_adapters(mid) == []
    assert engine.model_info(mid).effective_fingerprint == engine.model_info(mid).fingerprint


async def test_a_control_call_that_ran_keeps_its_effect_when_its_caller_has_gone(
    registry: erllama.plugins.BackendRegistry, tmp_path: pytest.TempPathFactory
) -> None:
    gate = threading.Event()
    ctl = metered()
    ctl.pack_gate = gate
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None))
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config(control=ctl))
        stream = await engine.infer(mid, "kabo rite sanu " * 10, max_tokens=100)
        release(ctl, 3)
        await wait_for(lambda: ctl.steps == 4 and ctl.waiting == 1)  # step 4 wants a permit

        async def give_up(caller: anyio.CancelScope) -> None:
            # The evict call is queued behind step 4. Once that step ends, the thread runs
            # the call, whose packing waits at the gate (no step under way): the caller
            # gives up then.
            await anyio.wait_all_tasks_blocked()
            release(ctl, 1)
            await wait_for(lambda: ctl.steps == 4 and ctl.active == 0 and ctl.waiting == 1)
            caller.cancel()

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as caller:
                tg.start_soon(give_up, caller)
                await engine.evict(mid)
        assert caller.cancelled_caught
        assert engine.cache_counters().saves_evict == 0
        gate.set()
        await wait_for(lambda: engine.cache_counters().saves_evict == 1)
        stream.cancel()
        release(ctl, 1000)
        await stream.collect()
