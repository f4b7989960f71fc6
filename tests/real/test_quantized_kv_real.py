"""A q8_0 KV cache on SmolLM2: every cell is computed the same however it was batched, so the
engine reuses generated tokens' cells too, and a cache hit still never changes an answer.

llama.cpp's CPU flash-attention kernel computes each query row on its own when K and V are
quantized (its tiled and split-KV paths are for f16/f32 only), and SmolLM2's Q4_1 weights
take one dot product per output element whatever the batch (research/exactness/
exp7_quantized_kv.py). The first test checks that fact with a plain llama-cpp-python loop
written here, with f16 beside it as the control that differs. The engine's answers are then
compared with the cache-off run of the same config in an engine of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import llama_cpp as L
import numpy as np
import pytest

import erllama

from .test_cache_real import OFF, QUESTIONS, SYSTEM, N
from .test_padded_prefill_real import Cold, answer, ask, cached
from .test_speculative_real import CHAT, EDITS, prompts_for, together

pytestmark = pytest.mark.anyio

FOLLOW = "<|im_end|>\n<|im_start|>user\nAnd after that?<|im_end|>\n<|im_start|>assistant\n"


def reply_cells(r: erllama.Completion) -> int:
    """The cells a finished reply left in its sequence: its tokens, and its end-of-turn
    token when it stopped on one (decoded too; FOLLOW starts with the same token)."""
    return len(r.token_ids) + (r.finish_reason == "stop")


@pytest.fixture
def q8(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    return attrs.evolve(smol_config, type_k="q8_0", type_v="q8_0", keep_live_kv=False)


_PLAIN: dict[tuple[Any, ...], tuple[list[int], bool]] = {}


def plain_logits(path: Path, prompt: Sequence[int], n: int, kv: int) -> tuple[list[int], bool]:
    """``_plain_logits``, each computed once (the asyncio and trio runs share it)."""
    key = (path, tuple(prompt), n, kv)
    if key not in _PLAIN:
        _PLAIN[key] = _plain_logits(path, prompt, n, kv)
    return _PLAIN[key]


def _plain_logits(path: Path, prompt: Sequence[int], n: int, kv: int) -> tuple[list[int], bool]:
    """Without erllama: ``prompt`` fed in one call, then ``n`` greedy tokens one per call;
    then in a fresh sequence prompt + those tokens fed in one call. The tokens, and whether
    the logits after the last token are bit for bit the same both ways."""
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024, 1024, 512, 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = kv
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(1024, 0, 1)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    try:

        def call(tokens: Sequence[int], at: int) -> np.ndarray:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, at + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(i == len(tokens) - 1)
            batch.n_tokens = len(tokens)
            assert L.llama_decode(ctx, batch) == 0
            ptr = L.llama_get_logits_ith(ctx, len(tokens) - 1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        logits = call(prompt, 0)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = call([out[-1]], len(prompt) + len(out) - 1)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        whole = call([*prompt, *out], 0)  # the logits after out[-1], as ``logits``
        return out, bool(np.array_equal(whole, logits))
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


async def test_llama_cpp_computes_a_decoded_token_as_a_prefill_of_it_with_q8_0_kv(
    q8: erllama.ModelConfig, smol_path: Path
) -> None:
    """The fact the engine relies on, with no erllama code: with q8_0 K and V, a token
    decoded one per call has the cells a one-call prefill of the same tokens computes
    (the next logits are equal to the last bit); with f16 (the control) they are not. And
    the engine's cache-off answer is the plain loop's."""
    async with erllama.open_engine(OFF) as off:
        mid = await off.load_model("cold", q8)
        prompt = await off.apply_chat_template(
            mid, [{"role": "user", "content": QUESTIONS[0]}], SYSTEM
        )
        r = await ask(off, mid, prompt)
    tokens, same = plain_logits(smol_path, prompt, N, L.GGML_TYPE_Q8_0)
    assert same
    assert list(r.token_ids) == tokens
    _, same_f16 = plain_logits(smol_path, prompt, N, L.GGML_TYPE_F16)
    assert not same_f16


async def test_a_next_turn_restores_the_previous_reply_too_and_answers_as_the_cold_run(
    q8: erllama.ModelConfig, tmp_path: Path
) -> None:
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", q8))
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", q8)
            follow = await engine.tokenize(mid, FOLLOW, add_special=False, parse_special=True)
            prompts = [
                await engine.apply_chat_template(mid, [{"role": "user", "content": q}], SYSTEM)
                for q in QUESTIONS[:4]
            ]
            for i, p in enumerate(prompts):
                r1 = await ask(engine, mid, p)
                assert answer(r1) == await cold(p), f"turn 1, prompt {i}"
                # The next turn: the first prompt and the whole reply are restored (its
                # tokens were decoded one at a time, and are what a prefill computes).
                p2 = [*p, *r1.token_ids, *follow]
                r2 = await ask(engine, mid, p2)
                assert r2.cache_hit_kind == "partial"
                # (An end-of-turn token ends a reply here, as FOLLOW starts: it was fed
                # too, and is restored with it.)
                assert r2.cache_delta.read == len(p) + reply_cells(r1), i
                assert answer(r2) == await cold(p2), f"turn 2, prompt {i}"
                # A resend: at least the first turn's row (prompt and reply) restored.
                r3 = await ask(engine, mid, p2)
                assert r3.cache_delta.read >= len(p) + len(r1.token_ids)
                assert answer(r3) == answer(r2)
        # A restart: rows from disk, replies included.
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", q8)
            p = prompts[0]
            r1 = await ask(engine, mid, p)
            assert engine.model_info(mid).last_cache_hit.tier == "disk"  # type: ignore[union-attr]
            assert answer(r1) == await cold(p)


async def test_conversations_sent_together_answer_as_each_alone_and_keep_their_replies(
    q8: erllama.ModelConfig,
) -> None:
    """Four conversations on four live sequences: their first and second turns go together
    (prefill chunks of several sequences in one call, decode rows side by side past 256
    cells), and each answer is the cold run's of that prompt alone; each second turn keeps
    its first prompt and reply live."""
    four = attrs.evolve(q8, n_seq_max=4, keep_live_kv=True)
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", q8))
        async with erllama.open_engine(OFF) as engine:
            mid = await engine.load_model("smol", four)
            follow = await engine.tokenize(mid, FOLLOW, add_special=False, parse_special=True)
            long_system = SYSTEM * 3  # past 256 cells
            firsts = [
                await engine.apply_chat_template(mid, [{"role": "user", "content": q}], long_system)
                for q in QUESTIONS[:4]
            ]
            assert min(map(len, firsts)) > 256
            replies: dict[int, erllama.Completion] = {}

            async def turn(i: int, prompt: list[int]) -> None:
                replies[i] = await ask(engine, mid, prompt)

            async with anyio.create_task_group() as tg:
                for i, p in enumerate(firsts):
                    tg.start_soon(turn, i, p)
            r1s = dict(replies)
            seconds = [[*p, *replies[i].token_ids, *follow] for i, p in enumerate(firsts)]
            for i in range(4):
                assert answer(replies[i]) == await cold(firsts[i]), i
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(seconds):
                    tg.start_soon(turn, i, p)
            for i in range(4):
                assert answer(replies[i]) == await cold(seconds[i]), i
                assert replies[i].cache_delta.read == len(firsts[i]) + reply_cells(r1s[i]), i


async def test_speculating_on_two_decode_threads_equals_the_plain_loop(
    q8: erllama.ModelConfig, smol_path: Path
) -> None:
    """With an f16 KV cache speculative decoding needs one decode thread (a verify pass
    must compute each token as a one-token pass); with q8_0 any count does. Four sequences
    speculate together on two decode threads; each answer is the plain loop's."""
    config = attrs.evolve(
        q8,
        n_threads=2,
        n_seq_max=4,
        speculative=erllama.SpeculativeConfig(draft_max=12, token_cost=0.05),
    )
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", config)
        texts = [*EDITS, CHAT[0]]
        prompts = await prompts_for(engine, mid, texts)
        results = await together(engine, mid, prompts, 48)
    for text, prompt, done in zip(texts, prompts, results, strict=True):
        reference, _ = await anyio.to_thread.run_sync(
            plain_logits, smol_path, prompt, 48, L.GGML_TYPE_Q8_0
        )
        assert done.token_ids == tuple(reference[: len(done.token_ids)]), text
        assert done.finish_reason == "stop" or len(done.token_ids) == 48
    assert sum(d.stats.draft_accepted for d in results) > 0


def test_speculative_decoding_may_use_several_decode_threads_with_q8_0_kv(
    smol_path: Path,
) -> None:
    kw: dict[str, Any] = {"model_path": smol_path, "speculative": {}}
    with pytest.raises(erllama.ConfigError, match="n_threads"):
        erllama.ModelConfig(n_threads=2, **kw)
    config = erllama.ModelConfig(n_threads=2, type_k="q8_0", type_v="q8_0", **kw)
    assert config.n_threads == 2


def test_a_quantized_v_cache_needs_flash_attention(smol_path: Path) -> None:
    with pytest.raises(erllama.ConfigError, match="flash_attn"):
        erllama.ModelConfig(model_path=smol_path, type_v="q8_0", flash_attn=False)
    erllama.ModelConfig(model_path=smol_path, type_k="q8_0", flash_attn=False)  # K alone: fine


def test_batch_invariance_is_claimed_only_where_it_was_measured(smol_path: Path) -> None:
    from erllama.backends.llama_native import LlamaModel

    q8 = erllama.ModelConfig(model_path=smol_path, type_k="q8_0", type_v="q8_0")
    claim = LlamaModel._batch_invariant
    assert claim(q8, {}, "q4_1") and claim(q8, {}, "q8_0") and claim(q8, {}, "q4_0")
    assert not claim(q8, {}, "q4_k_m")  # weights not measured
    assert not claim(attrs.evolve(q8, type_v="f16"), {}, "q4_1")
    assert not claim(attrs.evolve(q8, n_gpu_layers=1), {}, "q4_1")
    assert not claim(q8, {"type_k": L.GGML_TYPE_F16}, "q4_1")  # an option overrides the type
    assert not claim(q8, {"flash_attn_type": L.LLAMA_FLASH_ATTN_TYPE_AUTO}, "q4_1")
