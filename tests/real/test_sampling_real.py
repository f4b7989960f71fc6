"""Sampler stages and log-probabilities on SmolLM2, against a plain llama-cpp-python loop
written here: its own model, context, batch and sampler chain, built from llama.cpp's
low-level bindings (only ``ensure_backend`` comes from erllama), and its own log-softmax of
the raw logits in numpy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as L
import numpy as np
import pytest

import erllama
from erllama.backends.llama_native import ensure_backend

from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio


N_CTX = 512
N_BATCH = 256
N_TOKENS = 16
#: A prompt the model answers with repetitions, so the penalties change the answer.
PROMPT = "List the days of the week, twice: Monday, Tuesday, Wednesday, Thursday, Friday, Monday,"


def reference(
    model_path: Path,
    prompt: Sequence[int],
    chain: Callable[[Any, int], list[Any]],
    *,
    top: int = 0,
) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]]]:
    """Greedy generation of ``prompt`` with the sampler stages ``chain(vocab, n_vocab)``
    then argmax; per token, its log-probability under the raw logits and the ``top`` most
    likely tokens with theirs."""
    ensure_backend()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
    assert model
    cparams = L.llama_context_default_params()
    cparams.n_ctx = N_CTX
    cparams.kv_unified = False
    cparams.n_batch = cparams.n_ubatch = N_BATCH
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.type_k = cparams.type_v = L.GGML_TYPE_F16
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
    ctx = L.llama_init_from_model(model, cparams)
    assert ctx
    vocab = L.llama_model_get_vocab(model)
    n_vocab = int(L.llama_vocab_n_tokens(vocab))
    batch = L.llama_batch_init(N_BATCH, 0, 1)
    sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for stage in chain(vocab, n_vocab):
        L.llama_sampler_chain_add(sampler, stage)
    L.llama_sampler_chain_add(sampler, L.llama_sampler_init_greedy())
    try:

        def decode(tokens: Sequence[int], start: int) -> None:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i] = t, start + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            assert L.llama_decode(ctx, batch) == 0

        decode(prompt, 0)
        row = len(prompt) - 1
        out: list[int] = []
        probs: list[tuple[float, list[tuple[int, float]]]] = []
        for _ in range(N_TOKENS):
            tok = int(L.llama_sampler_sample(sampler, ctx, row))
            logits = np.ctypeslib.as_array(
                L.llama_get_logits_ith(ctx, row), shape=(n_vocab,)
            ).astype(np.float64)
            log_z = float(np.log(np.exp(logits - logits.max()).sum())) + float(logits.max())
            order = np.argsort(-logits, kind="stable")[:top]
            probs.append(
                (float(logits[tok]) - log_z, [(int(t), float(logits[t]) - log_z) for t in order])
            )
            if L.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            decode([tok], len(prompt) + len(out) - 1)
            row = 0
        return out, probs
    finally:
        L.llama_sampler_free(sampler)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


@pytest.fixture
def config(smol_path: Path) -> erllama.ModelConfig:
    """On the grid: the plain loop here feeds the prompt in one call, as the grid feeds a
    prompt shorter than a chunk (padded feeding is checked against a plain padded loop in
    test_padded_prefill_real.py)."""
    return erllama.ModelConfig(
        model_path=smol_path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=2, n_threads_batch=2,
        options=GRID_FEEDING,
    )  # fmt: skip


async def test_the_penalties_match_llama_cpps_own_sampler(
    llama_engine: erllama.Engine, config: erllama.ModelConfig, smol_path: Path
) -> None:
    mid = await llama_engine.load_model("m", config)
    prompt = await llama_engine.tokenize(mid, PROMPT)
    plain = await llama_engine.complete(mid, prompt, max_tokens=N_TOKENS)
    cases: list[dict[str, Any]] = [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.5, "penalty_last_n": 8},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.5},
    ]
    changed = 0
    for kw in cases:
        done = await llama_engine.complete(mid, prompt, max_tokens=N_TOKENS, **kw)
        last_n = kw.get("penalty_last_n", 64)

        def penalties(
            vocab: Any, n_vocab: int, kw: dict[str, Any] = kw, last_n: int = last_n
        ) -> list[Any]:
            return [
                L.llama_sampler_init_penalties(
                    n_vocab,
                    last_n,
                    kw.get("repetition_penalty", 1.0),
                    kw.get("frequency_penalty", 0.0),
                    kw.get("presence_penalty", 0.0),
                )
            ]

        ref, _ = reference(smol_path, prompt, penalties)
        assert list(done.token_ids) == ref, kw
        changed += done.token_ids != plain.token_ids
    assert changed >= 2  # the penalties really act on this prompt


async def test_a_logit_bias_bans_and_forces_tokens_as_llama_cpp_does(
    llama_engine: erllama.Engine, config: erllama.ModelConfig, smol_path: Path
) -> None:
    mid = await llama_engine.load_model("m", config)
    prompt = await llama_engine.tokenize(mid, PROMPT)
    plain = await llama_engine.complete(mid, prompt, max_tokens=N_TOKENS)
    banned = plain.token_ids[0]
    bias = {banned: -100.0, plain.token_ids[3]: 5.0}
    done = await llama_engine.complete(
        mid, prompt, max_tokens=N_TOKENS, logit_bias={str(k): v for k, v in bias.items()}
    )
    assert banned not in done.token_ids

    def biased(vocab: Any, n_vocab: int) -> list[Any]:
        arr = (L.llama_logit_bias * len(bias))(*(L.llama_logit_bias(t, b) for t, b in bias.items()))
        return [L.llama_sampler_init_logit_bias(n_vocab, len(bias), arr)]

    ref, _ = reference(smol_path, prompt, biased)
    assert list(done.token_ids) == ref
    with pytest.raises(erllama.InvalidRequest) as exc:
        await llama_engine.complete(mid, prompt, max_tokens=2, logit_bias={10**6: 1.0})
    assert exc.value.param == "logit_bias"


async def test_logprobs_equal_the_log_softmax_of_the_raw_logits(
    llama_engine: erllama.Engine, config: erllama.ModelConfig, smol_path: Path
) -> None:
    mid = await llama_engine.load_model("m", config)
    prompt = await llama_engine.tokenize(mid, PROMPT)
    done = await llama_engine.complete(mid, prompt, max_tokens=N_TOKENS, logprobs=5)
    ref, probs = reference(smol_path, prompt, lambda vocab, n: [], top=5)
    assert list(done.token_ids) == ref
    assert len(done.logprobs) == len(done.token_ids)
    for (chosen, alternatives), (ref_lp, ref_top), token in zip(
        done.logprobs, probs, done.token_ids, strict=False
    ):
        assert chosen.token_id == token
        assert math.isclose(chosen.logprob, ref_lp, abs_tol=1e-5)
        assert [a.token_id for a in alternatives] == [t for t, _ in ref_top]
        for a, (_, lp) in zip(alternatives, ref_top, strict=True):
            assert math.isclose(a.logprob, lp, abs_tol=1e-5)
        assert alternatives[0].logprob >= chosen.logprob - 1e-9  # greedy picked the top one
    # Streamed, each answer token carries its own (sampling does not change them: they
    # are the model's distribution, before the sampler).
    stream = await llama_engine.infer(mid, prompt, max_tokens=4, logprobs=0)
    tokens = [ev async for ev in stream if isinstance(ev, erllama.Token)]
    assert [t.logprob.token_id for t in tokens if t.logprob] == list(done.token_ids[:4])
    assert all(t.top_logprobs == () for t in tokens)
