"""The llama.cpp backend on a real model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama import Token
from erllama.backends import llama_cpp as llama_plugin
from erllama.fingerprint import clear_memo
from erllama.testing import BackendConformance

from ..helpers import wait_for
from .recording import RecordingLlama

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class TestLlamaConformance(BackendConformance):
    @pytest.fixture
    def backend_plugin(self) -> object:
        return llama_plugin

    @pytest.fixture
    def model_config(self, smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
        return smol_config


async def test_load_reports_the_model(
    llama_engine: erllama.Engine, smol: str, smol_path: Path
) -> None:
    info = llama_engine.model_info(smol)
    assert info.backend == "llama_cpp" and info.status == "idle"
    assert info.quant == "q4_1" and info.n_vocab == 49152 and info.n_ctx == 1024
    assert info.metadata["n_embd"] == "576" and info.metadata["architecture"] == "llama"
    assert info.capabilities == {"chat_template", "embed", "sampler", "adapters", "metadata"}
    assert info.fingerprint == hashlib.sha256(smol_path.read_bytes()).hexdigest()


async def test_fingerprint_is_remembered_and_can_be_overridden(
    llama_engine: erllama.Engine, smol_config: erllama.ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_memo()
    first = await llama_engine.load_model("a", smol_config)
    fp = llama_engine.model_info(first).fingerprint

    def no_rehash(*_a: Any) -> Any:
        raise AssertionError("the GGUF was hashed a second time")

    monkeypatch.setattr("erllama.fingerprint.sha256", no_rehash)
    second = await llama_engine.load_model("b", smol_config)
    assert llama_engine.model_info(second).fingerprint == fp
    mine = "ab" * 32
    third = await llama_engine.load_model("c", attrs.evolve(smol_config, fingerprint=mine))
    assert llama_engine.model_info(third).fingerprint == mine


async def test_greedy_is_deterministic_and_seeds_behave(
    llama_engine: erllama.Engine, smol: str
) -> None:
    prompt = await llama_engine.apply_chat_template(smol, CHAT)
    g1 = await llama_engine.complete(smol, prompt, max_tokens=12)
    g2 = await llama_engine.complete(smol, prompt, max_tokens=12, seed=99)  # ignored when greedy
    assert g1.token_ids == g2.token_ids
    kw: dict[str, Any] = {"max_tokens": 16, "temperature": 1.2, "top_k": 200}
    s1 = await llama_engine.complete(smol, prompt, seed=1, **kw)
    s1b = await llama_engine.complete(smol, prompt, seed=1, **kw)
    s2 = await llama_engine.complete(smol, prompt, seed=2, **kw)
    assert s1.token_ids == s1b.token_ids
    assert s1.token_ids != s2.token_ids


async def test_grammar_constrains_output_and_never_leaks(
    llama_engine: erllama.Engine, smol: str
) -> None:
    prompt = await llama_engine.apply_chat_template(
        smol, [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    )
    before = await llama_engine.complete(smol, prompt, max_tokens=10)
    for seed in range(4):
        r = await llama_engine.complete(
            smol, prompt, grammar='root ::= "yes" | "no"', temperature=1.0, seed=seed, max_tokens=10
        )
        assert r.text in ("yes", "no")
        assert r.finish_reason == "stop"
    after = await llama_engine.complete(smol, prompt, max_tokens=10)
    assert after.token_ids == before.token_ids
    with pytest.raises(erllama.InvalidRequest) as exc:
        await llama_engine.infer(smol, prompt, grammar="root ::= [unclosed")
    assert exc.value.param == "grammar"
    assert llama_engine.model_info(smol).queue_len == 0


async def test_chat_template_renders_the_ggufs_own_template(
    llama_engine: erllama.Engine, smol: str
) -> None:
    ids = await llama_engine.apply_chat_template(smol, CHAT)
    text = await llama_engine.detokenize(smol, ids)
    assert "What is the capital of France?" in text
    im_start = (
        await llama_engine.tokenize(smol, "<|im_start|>", add_special=False, parse_special=True)
    )[0]
    assert ids.count(im_start) == 3  # default system, user, assistant prompt
    with_system = await llama_engine.apply_chat_template(smol, CHAT, system="Answer in one word.")
    assert "Answer in one word." in await llama_engine.detokenize(smol, with_system)
    tools = [{"name": "get_weather", "description": "Weather for a city"}]
    with_tools = await llama_engine.apply_chat_template(smol, CHAT, tools=tools)
    assert "get_weather" in await llama_engine.detokenize(smol, with_tools)
    with pytest.raises(erllama.InvalidRequest):
        await llama_engine.apply_chat_template(smol, [{"role": "user"}])


async def test_embeddings(llama_engine: erllama.Engine, smol: str) -> None:
    prompt = await llama_engine.apply_chat_template(smol, CHAT)
    before = await llama_engine.complete(smol, prompt, max_tokens=8)
    a = await llama_engine.embed(smol, "The cat sat on the mat.")
    assert len(a) == 576
    assert a == await llama_engine.embed(smol, "The cat sat on the mat.")
    assert a != await llama_engine.embed(smol, "Quarterly revenue grew by four percent.")
    # Embedding runs in its own context: a generation is unaffected by one in between.
    stream = await llama_engine.infer(smol, prompt, max_tokens=8)
    await llama_engine.embed(smol, "in between")
    tokens = [ev.token_id async for ev in stream if isinstance(ev, Token)]
    assert tuple(tokens) == before.token_ids


async def test_lora_changes_greedy_output_at_scale_one_and_not_at_zero(
    llama_engine: erllama.Engine, smol: str, lora_path: Path, foreign_lora_path: Path
) -> None:
    prompt = "The meaning of life is"
    base = await llama_engine.complete(smol, prompt, max_tokens=16)
    base_fp = llama_engine.model_info(smol).effective_fingerprint
    handle = await llama_engine.load_adapter(smol, str(lora_path))
    (info,) = llama_engine.list_adapters(smol)
    assert info.sha256 == hashlib.sha256(lora_path.read_bytes()).hexdigest() and info.scale == 1.0
    tuned = await llama_engine.complete(smol, prompt, max_tokens=16)
    assert tuned.token_ids != base.token_ids
    assert llama_engine.model_info(smol).effective_fingerprint != base_fp
    await llama_engine.set_adapter_scale(smol, handle, 0.0)
    assert (await llama_engine.complete(smol, prompt, max_tokens=16)).token_ids == base.token_ids
    with pytest.raises(erllama.BackendError):
        await llama_engine.load_adapter(smol, str(foreign_lora_path))
    await llama_engine.unload_adapter(smol, handle)
    assert llama_engine.list_adapters(smol) == []
    assert (await llama_engine.complete(smol, prompt, max_tokens=16)).token_ids == base.token_ids


async def test_streamed_text_never_splits_a_character(
    llama_engine: erllama.Engine, smol: str
) -> None:
    literal = "日本語の🙂 café"
    stream = await llama_engine.infer(
        smol, "Say it:", grammar=f'root ::= "{literal}"', max_tokens=64
    )
    pieces = [ev async for ev in stream if isinstance(ev, Token)]
    # The model really does split these characters across tokens ...
    raw = [await llama_engine.detokenize(smol, [p.token_id]) for p in pieces]
    assert any("\ufffd" in r for r in raw)
    # ... and the stream still never shows a broken one.
    assert all("\ufffd" not in p.text for p in pieces)
    assert "".join(p.text for p in pieces) == literal


async def test_models_serve_at_once_on_the_shared_compute_thread_and_their_own(
    llama_engine: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    # a and b compute on the process's one compute thread (the default), c on its own:
    # taking turns step by step, each answers what it answers alone.
    a = await llama_engine.load_model("a", smol_config)
    b = await llama_engine.load_model("b", attrs.evolve(smol_config, n_ctx=512))
    own = attrs.evolve(smol_config, options={"compute_thread": "own"})
    c = await llama_engine.load_model("c", own)
    alone = await llama_engine.complete(a, "Once upon a time", max_tokens=12)
    results: dict[str, erllama.Completion] = {}

    async def run(mid: str) -> None:
        results[mid] = await llama_engine.complete(mid, "Once upon a time", max_tokens=12)

    async with anyio.create_task_group() as tg:
        for mid in (a, b, c):
            tg.start_soon(run, mid)
    assert {results[m].token_ids for m in (a, b, c)} == {alone.token_ids}  # same weights
    with pytest.raises(erllama.ConfigError, match="compute_thread"):
        bad = attrs.evolve(smol_config, options={"compute_thread": "mine"})
        await llama_engine.load_model("bad", bad)


async def test_two_different_ggufs_decode_together_as_each_does_alone(
    no_cache: erllama.EngineConfig, smol_config: erllama.ModelConfig, smol_q8_path: Path
) -> None:
    # Q4_1 and Q8_0 files take turns on the one compute thread; each answers what it answers
    # as the only model of a fresh engine.
    configs = {"q4": smol_config, "q8": attrs.evolve(smol_config, model_path=smol_q8_path)}
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]

    async def answer(engine: erllama.Engine, mid: str) -> tuple[int, ...]:
        prompt = await engine.apply_chat_template(mid, messages)
        return (await engine.complete(mid, prompt, max_tokens=24)).token_ids

    alone: dict[str, tuple[int, ...]] = {}
    for name, config in configs.items():
        async with erllama.open_engine(no_cache) as engine:
            alone[name] = await answer(engine, await engine.load_model(name, config))
    together: dict[str, tuple[int, ...]] = {}
    async with erllama.open_engine(no_cache) as engine:
        for name, config in configs.items():
            await engine.load_model(name, config)
        assert [engine.model_info(n).quant for n in configs] == ["q4_1", "q8_0"]

        async def run(name: str) -> None:
            together[name] = await answer(engine, name)

        async with anyio.create_task_group() as tg:
            for name in configs:
                tg.start_soon(run, name)
    assert together == alone
    assert all(len(ids) == 24 for ids in alone.values()), alone  # no early end: a real run


async def test_cancel_mid_generation(llama_engine: erllama.Engine, smol: str) -> None:
    prompt = await llama_engine.apply_chat_template(
        smol, [{"role": "user", "content": "Write a very long story about a dragon."}]
    )
    stream = await llama_engine.infer(smol, prompt, max_tokens=400)
    n = 0
    async for ev in stream:
        if isinstance(ev, Token):
            n += 1
            if n == 3:
                stream.cancel()
        else:
            assert ev.finish_reason == "cancelled"
            # The reader may lag a few tokens behind the model, never more than that.
            assert ev.stats.completion_tokens < 20
    assert n < 20
    assert (await llama_engine.complete(smol, "Hello", max_tokens=3)).token_ids


async def test_cancel_during_a_long_prefill_acts_within_one_chunk(
    no_cache: erllama.EngineConfig, smol_config: erllama.ModelConfig
) -> None:
    spy = RecordingLlama()
    async with erllama.open_engine(no_cache, backends=spy.registry()) as engine:
        config = attrs.evolve(smol_config, backend="spy", prefill_chunk=64)
        mid = await engine.load_model("m", config)
        prompt = list(range(1000, 1900))  # 900 tokens: 15 chunks of 64
        stream = await engine.infer(mid, prompt, max_tokens=5)
        await wait_for(lambda: spy.steps)
        stream.cancel()
        events = [ev async for ev in stream]
        assert events[-1].finish_reason == "cancelled"  # type: ignore[union-attr]
        assert len(spy.steps) <= 3  # at most the chunk in flight and one more
        assert all(len(tokens) <= 64 for step in spy.steps for _, _, tokens, _ in step)


async def test_bad_input_gets_typed_errors_and_the_engine_keeps_serving(
    llama_engine: erllama.Engine,
    smol: str,
    smol_config: erllama.ModelConfig,
    smol_path: Path,
    tmp_path: Path,
) -> None:
    missing = attrs.evolve(smol_config, model_path=tmp_path / "missing.gguf")
    with pytest.raises(erllama.BackendError) as exc:
        await llama_engine.load_model("missing", missing)
    assert isinstance(exc.value.__cause__, FileNotFoundError)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("definitely not a model")
    with pytest.raises(erllama.BackendError, match="not a GGUF"):
        await llama_engine.load_model("text", attrs.evolve(smol_config, model_path=not_gguf))
    truncated = tmp_path / "truncated.gguf"
    with smol_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(3_000_000))
    with pytest.raises(erllama.BackendError, match="could not load"):
        await llama_engine.load_model("cut", attrs.evolve(smol_config, model_path=truncated))
    with pytest.raises(erllama.ConfigError):
        await llama_engine.load_model("opt", attrs.evolve(smol_config, options={"no_such_knob": 1}))
    with pytest.raises(erllama.InvalidRequest) as too_long:
        await llama_engine.infer(smol, list(range(100, 1200)))
    assert too_long.value.param == "prompt"
    with pytest.raises(erllama.InvalidRequest):
        await llama_engine.infer(smol, [49152])
    with pytest.raises(erllama.InvalidRequest):
        await llama_engine.detokenize(smol, [-3])
    assert [i.id for i in llama_engine.list_models()] == [smol]
    assert (await llama_engine.complete(smol, "Still here?", max_tokens=3)).token_ids
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_two_sequences_batch_together_and_match_their_solo_runs(
    no_cache: erllama.EngineConfig, smol_config: erllama.ModelConfig
) -> None:
    # The batched runs and their references share no KV: the batch runs in a fresh engine,
    # each reference alone on a model (own context) of its own in another fresh engine.
    prompts = ["The capital of France is", "Water boils at"]
    spy = RecordingLlama()
    together: dict[str, erllama.Completion] = {}
    async with erllama.open_engine(no_cache, backends=spy.registry()) as engine:
        mid = await engine.load_model("duo", attrs.evolve(smol_config, backend="spy", n_seq_max=2))
        assert engine.model_info(mid).n_seq_max == 2

        async def run(p: str) -> None:
            together[p] = await engine.complete(mid, p, max_tokens=12)

        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(run, p)
    assert spy.most_decoding() == 2  # they really shared steps
    solo_config = attrs.evolve(smol_config, keep_live_kv=False)
    async with erllama.open_engine(no_cache) as engine:
        for i, p in enumerate(prompts):
            solo_mid = await engine.load_model(f"solo{i}", solo_config)
            solo = await engine.complete(solo_mid, p, max_tokens=12)
            assert together[p].cache_hit_kind == solo.cache_hit_kind == "cold"
            assert together[p].token_ids == solo.token_ids
            await engine.unload_model(solo_mid)
