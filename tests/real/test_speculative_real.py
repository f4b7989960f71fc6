"""Speculative decoding on SmolLM2 (issue 21): greedy tokens equal plain decoding, always,
and drawn tokens equal a plain loop drawing with the same seed.

The reference is a plain llama-cpp-python loop written here: its own model, context, batch
and greedy sampler, flash attention on and one decode thread (what ``ModelConfig.speculative``
loads with; two prefill threads), the prompt fed in 64-token chunks on the engine's
documented grid, then one token per ``llama_decode``. erllama verifies each draft in one multi-token pass instead; the tokens
must be the same. Prompts: an "edit" set (copy a passage with a word changed, rename a
variable, fill JSON from a document), where the n-gram drafter has much to draft, and free
chat, where it has little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import attrs
import llama_cpp as L
import pytest

import erllama
from erllama.backends.llama_native import ensure_backend
from erllama.speculative import draft_model, make_drafter_registry, ngram

from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio


@pytest.fixture
def smol_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    """On the grid: the plain loops here feed the prompt in the grid's chunks; padded
    feeding is checked against its own plain loop in test_padded_prefill_real.py."""
    return attrs.evolve(smol_config, options=GRID_FEEDING)


#: The built-in drafters by name, as their entry points register them.
DRAFTERS = make_drafter_registry({"ngram": ngram, "model": draft_model}, autoload=False)

OFF = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
GRID = 64
N_TOKENS = 64

PASSAGE = (
    "The harbour office opens at half past six. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros; children travel free and bicycles cost three euros."
)
CODE = (
    "def total(items):\n    result = 0\n    for item in items:\n"
    "        result += item.price * item.count\n    return result\n"
)
DOC = "Order 1182 was placed by Mira Jensen in Aarhus on 3 May for 4 lamps at 39 euros each."
EDITS = [
    f"Copy this text exactly, but write 'nine' instead of 'ten':\n\n{PASSAGE}",
    f"Rewrite this function with the variable result renamed to acc:\n\n{CODE}",
    'Fill in the JSON object {"order": , "name": , "city": , "count": } from this '
    f"text:\n\n{DOC}",
]
LOG = "\n".join(
    f"{9 + i // 6:02d}:{i * 7 % 60:02d} pier {i % 5} ferry {'ABCDE'[i % 5]}{i} departed, "
    f"{12 + i % 9} passengers"
    for i in range(24)
)
# Past 256 cells, where llama.cpp's one-token pass would split the cells across decode
# threads (the engine decodes on one thread for this reason).
EDITS.append(f"Copy this log exactly, changing nothing:\n\n{LOG}")
CHAT = ["Tell me a short story about a lighthouse keeper.", "What makes bread rise?"]


#: A request that draws, and the same chain built by hand for the plain loop.
DRAWN = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def drawing_chain(seed: int) -> Any:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(40))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(0.95, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(0.05, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(0.8))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


def plain_greedy(
    model_path: Path, prompt: Sequence[int], max_tokens: int, n_threads: int
) -> list[int]:
    return plain_loop(model_path, prompt, max_tokens, n_threads, L.llama_sampler_init_greedy)


def plain_loop(
    model_path: Path,
    prompt: Sequence[int],
    max_tokens: int,
    n_threads: int,
    new_sampler: Callable[[], Any],
) -> list[int]:
    """Tokens of a plain llama.cpp loop sampling with ``new_sampler()``, one token per
    ``llama_decode``, up to an end-of-generation token (not included: erllama never
    reports one)."""
    ensure_backend()
    model = ctx = sampler = None
    batch = None
    try:
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
        assert model
        cparams = L.llama_context_default_params()
        cparams.n_ctx = 1024
        cparams.n_batch = cparams.n_ubatch = 256
        cparams.n_seq_max = 1
        cparams.n_threads = 1
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = L.llama_init_from_model(model, cparams)
        assert ctx
        vocab = L.llama_model_get_vocab(model)
        batch = L.llama_batch_init(256, 0, 1)
        sampler = new_sampler()

        def decode(tokens: Sequence[int], pos: int) -> None:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(tokens) - 1
            assert L.llama_decode(ctx, batch) == 0

        for start in range(0, len(prompt), GRID):
            decode(prompt[start : start + GRID], start)
        out: list[int] = []
        pos = len(prompt)
        while len(out) < max_tokens:
            tok = int(L.llama_sampler_sample(sampler, ctx, batch.n_tokens - 1))
            if L.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            decode([tok], pos)
            pos += 1
        return out
    finally:
        if sampler is not None:
            L.llama_sampler_free(sampler)
        if batch is not None:
            L.llama_batch_free(batch)
        if ctx is not None:
            L.llama_free(ctx)
        if model is not None:
            L.llama_model_free(model)


@pytest.fixture
def spec_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    # The token cost is given, not learnt from step times, so how much is drafted
    # depends only on what is accepted (deterministic), never on the machine's load.
    return attrs.evolve(
        smol_config,
        n_threads=None,
        speculative=erllama.SpeculativeConfig(draft_max=12, token_cost=0.05),
    )


async def prompts_for(engine: erllama.Engine, mid: str, texts: Sequence[str]) -> list[list[int]]:
    return [await engine.apply_chat_template(mid, [{"role": "user", "content": t}]) for t in texts]


async def together(
    engine: erllama.Engine, mid: str, prompts: Sequence[list[int]], max_tokens: int
) -> list[erllama.Completion]:
    """Every prompt admitted at once (each its own sequence), then each answer collected."""
    streams = [await engine.infer(mid, p, max_tokens=max_tokens) for p in prompts]
    results = []
    for s in streams:
        async with s:
            results.append(await s.collect())
    return results


async def test_greedy_tokens_equal_a_plain_llama_cpp_loop(
    smol_path: Path, spec_config: erllama.ModelConfig
) -> None:
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", spec_config)
        accepted = {}
        prompts = await prompts_for(engine, mid, EDITS + CHAT)
        for text, prompt in zip(EDITS + CHAT, prompts, strict=True):
            done = await engine.complete(mid, prompt, max_tokens=N_TOKENS)
            reference = await anyio.to_thread.run_sync(plain_greedy, smol_path, prompt, N_TOKENS, 2)
            assert done.token_ids == tuple(reference), text
            assert done.stats.draft_accepted <= done.stats.draft_tokens
            accepted[text] = done.stats.draft_accepted
    # The edits copy their input: most of each answer comes from accepted drafts.
    assert sum(accepted[t] for t in EDITS) >= N_TOKENS, accepted


async def test_drawn_tokens_equal_a_plain_loop_drawing_with_the_same_seed(
    smol_path: Path, spec_config: erllama.ModelConfig
) -> None:
    # Each place is drawn once, in order, from the same logits and random stream as the
    # plain loop draws it: a drafted token is kept where the draw matches it, and the
    # draw that does not match is the next token. So a seed gives the plain loop's tokens.
    texts = [EDITS[0], EDITS[3], CHAT[0]]
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", spec_config)
        prompts = await prompts_for(engine, mid, texts)
        runs = []
        for seed in (3, 11):
            for prompt in prompts:
                done = await engine.complete(mid, prompt, max_tokens=48, seed=seed, **DRAWN)
                runs.append((seed, prompt, done))
    for seed, prompt, done in runs:
        reference = await anyio.to_thread.run_sync(
            plain_loop, smol_path, prompt, 48, 2, partial(drawing_chain, seed)
        )
        assert done.token_ids == tuple(reference), (seed, done.text)
    stats = [done.stats for _, _, done in runs]
    assert sum(s.draft_accepted for s in stats) > 0
    # Some drafts were rejected by a draw, and their draws became the next tokens.
    assert any(s.draft_accepted < s.draft_tokens for s in stats)


async def test_sequences_speculating_together_equal_the_plain_loop(
    smol_path: Path, spec_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(spec_config, n_seq_max=4)
    texts = [*EDITS, CHAT[0]]
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", config)
        prompts = await prompts_for(engine, mid, texts)
        results = await together(engine, mid, prompts, 48)
    for text, prompt, done in zip(texts, prompts, results, strict=True):
        reference = await anyio.to_thread.run_sync(plain_greedy, smol_path, prompt, 48, 2)
        assert done.token_ids == tuple(reference), text
    assert sum(d.stats.draft_accepted for d in results) > 0


@pytest.mark.parametrize("sampling", [{}, {**DRAWN, "seed": 9}], ids=["greedy", "drawn"])
async def test_a_grammar_rejects_drafted_tokens_it_forbids(
    spec_config: erllama.ModelConfig, sampling: dict[str, Any]
) -> None:
    # Digits only: the n-gram drafter proposes words from the prompt, which the grammar
    # forbids, so the answer must be the grammar's, exactly as without speculation.
    grammar = 'root ::= [0-9]+ " " [a-z]+ " " [0-9]+'
    text = EDITS[2]
    answers = []
    for speculative in (True, False):
        async with erllama.open_engine(OFF) as engine:
            mid = await engine.load_model("smol", spec_config)
            (prompt,) = await prompts_for(engine, mid, [text])
            done = await engine.complete(
                mid, prompt, max_tokens=24, grammar=grammar, speculative=speculative, **sampling
            )
            answers.append(done)
    assert answers[0].token_ids == answers[1].token_ids
    assert answers[0].text == answers[1].text
    assert answers[1].stats.draft_tokens == 0


async def test_after_many_rejected_drafts_the_cache_and_live_kv_answer_exactly(
    tmp_path: Path, spec_config: erllama.ModelConfig, smol_config: erllama.ModelConfig
) -> None:
    """A chat turn whose drafts are mostly rejected, then the next turn on the same engine
    (live KV and a RAM row): it answers as a cold cache-off engine without speculation."""
    cache = erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=tmp_path / "disk")
    )
    system = "You answer questions about baking. " + PASSAGE * 3  # past two grid cells
    messages = [{"role": "user", "content": CHAT[1]}]
    async with erllama.open_engine(cache) as engine:
        mid = await engine.load_model("smol", spec_config)
        prompt = await engine.apply_chat_template(mid, messages, system)
        first = await engine.complete(mid, prompt, max_tokens=N_TOKENS)
        assert first.stats.draft_tokens > first.stats.draft_accepted
        # Nothing of a rejected draft is in the sequence: its context is the prompt and
        # the generated tokens (and the end of generation), nothing more.
        assert len(first.context_tokens) - len(prompt) in (
            len(first.token_ids),
            len(first.token_ids) + 1,
        )
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Say that again in one sentence."},
        ]
        follow = await engine.apply_chat_template(mid, messages, system)
        second = await engine.complete(mid, follow, max_tokens=32)
        assert second.stats.cache_delta.read >= GRID
    async with erllama.open_engine(OFF) as engine:
        cold = attrs.evolve(
            smol_config, n_threads=1, n_threads_batch=2, flash_attn=True, keep_live_kv=False
        )
        mid = await engine.load_model("cold", cold)
        reference = await engine.complete(mid, follow, max_tokens=32)
    assert second.token_ids == reference.token_ids


async def test_a_draft_model_drafts_and_the_answer_stays_plain(
    smol_path: Path, spec_config: erllama.ModelConfig
) -> None:
    # SmolLM2 as its own draft model: the drafts are the model's own greedy tokens, so
    # nearly all are accepted; the answer is the plain loop's either way.
    config = attrs.evolve(
        spec_config,
        speculative=erllama.SpeculativeConfig(
            drafter="model", draft_max=8, token_cost=0.05, options={"model_path": str(smol_path)}
        ),
    )
    async with erllama.open_engine(OFF, drafters=DRAFTERS) as engine:
        mid = await engine.load_model("smol", config)
        prompts = await prompts_for(engine, mid, [EDITS[0], CHAT[0]])
        results = [await engine.complete(mid, p, max_tokens=48) for p in prompts]
        with pytest.raises(erllama.NotSupported, match="draft_tokens"):
            await engine.draft_tokens(mid, prompts[0], 4)
        # Unloading frees the draft model on the model's thread first.
        await engine.unload_model(mid)
    for prompt, done in zip(prompts, results, strict=True):
        reference = await anyio.to_thread.run_sync(plain_greedy, smol_path, prompt, 48, 2)
        assert done.token_ids == tuple(reference)
        stats = done.stats
        assert stats.draft_tokens > 0 and stats.draft_accepted >= 0.9 * stats.draft_tokens


async def test_a_draft_model_that_cannot_serve_the_model_fails_its_load(
    tmp_path: Path, spec_config: erllama.ModelConfig, smol_config: erllama.ModelConfig
) -> None:
    not_gguf = tmp_path / "draft.gguf"
    not_gguf.write_bytes(b"not a model")
    async with erllama.open_engine(OFF, drafters=DRAFTERS) as engine:
        for options, match in (
            ({"model_path": str(not_gguf)}, "not a GGUF file"),
            ({}, "options.model_path"),
        ):
            config = attrs.evolve(
                spec_config,
                speculative=erllama.SpeculativeConfig(drafter="model", options=options),
            )
            with pytest.raises(erllama.ConfigError, match=match):
                await engine.load_model("smol", config)
        # The engine serves on.
        mid = await engine.load_model("plain", smol_config)
        assert len((await engine.complete(mid, "Hi", max_tokens=4)).token_ids) == 4


def test_the_draft_model_vocabulary_is_checked(smol_path: Path) -> None:
    from erllama.backends.llama_native import LlamaModel
    from erllama.speculative.draft_model import _check_vocab

    target = LlamaModel(erllama.ModelConfig(model_path=smol_path, n_ctx=256, n_batch=64))
    try:
        _check_vocab(target, target)  # the same vocabulary passes

        class Other:
            n_vocab = target.n_vocab
            eog = target.eog

            def piece(self, token: int, special: bool = False) -> bytes:
                return target.piece(token, special) if token != 98 else b"?!"

        _check_vocab(target, Other())  # token 98 is not in the sample (every 97th id)
        Other.piece = lambda self, token, special=False: b"x"  # type: ignore[method-assign]
        with pytest.raises(ValueError, match="token 0 is"):
            _check_vocab(target, Other())
        Other.eog = frozenset({1})
        with pytest.raises(ValueError, match="ends generation on other tokens"):
            _check_vocab(target, Other())
        Other.n_vocab = 100
        with pytest.raises(ValueError, match="100 tokens"):
            _check_vocab(target, Other())
    finally:
        target.free()
