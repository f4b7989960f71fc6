"""Padded prefill chunks on SmolLM2 (the default on the CPU with flash attention): a cache hit
still never changes an answer, and a prompt's every cell is reused.

With padding, each prompt chunk shorter than 64 tokens gets filler rows (removed after the
call), so every prompt cell is computed by the same kernel wherever its chunk starts
(research/exactness/exp6_padding.py). The engine then reuses any prompt prefix, not only
whole grid cells. The reference for every warm answer is the cache-off run of the same
config in an engine of its own (every prompt fed cold from position 0), and the cache-off
run itself is checked against a plain llama-cpp-python loop written here.
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

# The chats of the grid's own exactness tests, and their cache-off engine config.
from .grid import GRID_FEEDING
from .test_cache_real import OFF, QUESTIONS, SYSTEM, N

pytestmark = pytest.mark.anyio


@pytest.fixture
def padded(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    """The default on the CPU with flash attention: no option asks for padded chunks."""
    assert not smol_config.options and smol_config.flash_attn is None
    return attrs.evolve(smol_config, keep_live_kv=False)


def cached(tmp_path: Path, **fields: Any) -> erllama.EngineConfig:
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=tmp_path / "disk", **fields)
    )


async def ask(engine: erllama.Engine, mid: str, prompt: Sequence[int], **kw: Any) -> Any:
    """A greedy answer with each token's log-probability: equal answers then mean logits
    equal to the last bit where it matters, not only the same argmax."""
    return await engine.complete(mid, list(prompt), max_tokens=N, logprobs=0, **kw)


def answer(r: erllama.Completion) -> tuple[Any, ...]:
    return (r.token_ids, tuple(own.logprob for own, _ in r.logprobs))


class Cold:
    """Answers of the cache-off run (each computed once)."""

    def __init__(self, engine: erllama.Engine, mid: str) -> None:
        self.engine, self.mid = engine, mid
        self._known: dict[tuple[int, ...], tuple[Any, ...]] = {}

    async def __call__(self, prompt: Sequence[int]) -> tuple[Any, ...]:
        key = tuple(prompt)
        if key not in self._known:
            r = await ask(self.engine, self.mid, prompt)
            assert r.cache_hit_kind == "cold"
            self._known[key] = answer(r)
        return self._known[key]


def plain_padded_loop(path: Path, prompt: Sequence[int], n: int) -> list[int]:
    """The reference, without erllama: the prompt fed in chunks of 64 from position 0, the
    last one padded with fillers (removed after), then n greedy tokens one at a time."""
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024, 256, 256, 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(256, 0, 1)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    try:

        def call(tokens: Sequence[int], at: int, logits_row: int) -> np.ndarray:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, at + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(i == logits_row)
            batch.n_tokens = len(tokens)
            assert L.llama_decode(ctx, batch) == 0
            ptr = L.llama_get_logits_ith(ctx, logits_row)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        logits = None
        for at in range(0, len(prompt), 64):
            chunk = list(prompt[at : at + 64])
            real = len(chunk)
            logits = call(chunk + [chunk[-1]] * (64 - real), at, real - 1)
            L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, at + real, -1)
        out: list[int] = []
        assert logits is not None
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = call([out[-1]], len(prompt) + len(out) - 1, 0)
        return out
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


async def test_every_warm_path_answers_as_the_cache_off_run_and_reuses_every_prompt_cell(
    padded: erllama.ModelConfig, smol_path: Path, tmp_path: Path
) -> None:
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", padded))
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", padded)
            prompts = [
                await engine.apply_chat_template(mid, [{"role": "user", "content": q}], SYSTEM)
                for q in QUESTIONS[:6]
            ]
            # The cache-off run is plain padded decoding.
            first_cold = await cold(prompts[0])
            assert list(first_cold[0]) == plain_padded_loop(smol_path, prompts[0], N)
            first = []
            for i, p in enumerate(prompts):
                r = await ask(engine, mid, p)
                assert answer(r) == await cold(p), f"first pass, prompt {i}"
                first.append(r)
            # Resent: all but the last token restored (it is fed again for its logits).
            for i, p in enumerate(prompts):
                r = await ask(engine, mid, p)
                assert r.cache_hit_kind == "exact" and r.cache_delta.read == len(p) - 1, i
                assert answer(r) == await cold(p), f"resent, prompt {i}"
            # A prompt ending inside a longer row: a row it starts with serves.
            for p in prompts[:2]:
                part = p[: len(p) - 7]
                r = await ask(engine, mid, part)
                assert r.cache_hit_kind != "cold"
                assert answer(r) == await cold(part)
            # The next turn from the finish key: the whole first prompt is restored,
            # its last partial cell included (only the reply is fed again).
            follow = await engine.tokenize(
                mid,
                "<|im_end|>\n<|im_start|>user\nAnd after that?<|im_end|>\n<|im_start|>assistant\n",
                add_special=False,
                parse_special=True,
            )
            for p, r1 in list(zip(prompts, first, strict=True))[:3]:
                assert len(p) % 64  # a last partial cell to reuse
                p2 = [*p, *r1.token_ids, *follow]
                r2 = await ask(engine, mid, p2, parent_key=r1.finish_key)
                assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == len(p)
                assert answer(r2) == await cold(p2)
        # A restart: rows from disk.
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", padded)
            for p in prompts[:2]:
                r = await ask(engine, mid, p)
                assert engine.model_info(mid).last_cache_hit.tier == "disk"  # type: ignore[union-attr]
                assert answer(r) == await cold(p)


async def test_conversations_sent_together_restore_their_whole_previous_prompt(
    padded: erllama.ModelConfig,
) -> None:
    """Four conversations on four live sequences send their second turns at once: each
    keeps its whole first prompt live and answers as the cold run."""
    four = attrs.evolve(padded, n_seq_max=4, keep_live_kv=True, n_ctx=1024)
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", padded))
        async with erllama.open_engine(OFF) as engine:
            mid = await engine.load_model("smol", four)
            chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
            firsts: list[list[int]] = []
            replies: dict[int, erllama.Completion] = {}

            async def turn(i: int, prompt: list[int]) -> None:
                replies[i] = await ask(engine, mid, prompt)

            for chat in chats:
                firsts.append(await engine.apply_chat_template(mid, chat, SYSTEM))
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(firsts):
                    tg.start_soon(turn, i, p)
            seconds = []
            for i, chat in enumerate(chats):
                text = await engine.detokenize(mid, replies[i].token_ids)
                chat2 = [*chat, {"role": "assistant", "content": text}]
                chat2.append({"role": "user", "content": "Thank you. Anything else?"})
                p2 = await engine.apply_chat_template(mid, chat2, SYSTEM)
                assert p2[: len(firsts[i])] == firsts[i]
                seconds.append(p2)
            for i in range(4):
                assert answer(replies[i]) == await cold(firsts[i])
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(seconds):
                    tg.start_soon(turn, i, p)
            for i in range(4):
                assert answer(replies[i]) == await cold(seconds[i]), i
                # The whole first prompt, last partial cell included, from its live sequence.
                assert replies[i].cache_delta.read == len(firsts[i]), i


async def test_prompts_near_the_end_of_the_context_stay_exact(
    padded: erllama.ModelConfig, tmp_path: Path
) -> None:
    """The last 63 cells of a context have no room for fillers: they are never kept, and a
    prompt reaching into them still answers as the cold run."""
    small = attrs.evolve(padded, n_ctx=512)
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", small))
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", small)
            prompt = list(range(2000, 2000 + 490))  # ends 22 cells short of 512
            first = await ask(engine, mid, prompt)
            assert answer(first) == await cold(prompt)
            again = await ask(engine, mid, prompt)
            assert again.cache_delta.read == 512 - 64 + 1  # up to where fillers fit
            assert answer(again) == answer(first)


async def test_a_row_saved_on_the_grid_restores_no_further_than_fillers_fit(
    padded: erllama.ModelConfig, tmp_path: Path
) -> None:
    """Rows are shared with engines that feed on the grid (same cache folder, same layout).
    Such a row may hold whole grid cells inside the last 63 cells of the context, which a
    padded engine feeds as one unpadded chunk from where fillers stop fitting: it restores
    only up to there, and answers as its cold run."""
    padded = attrs.evolve(padded, n_ctx=1024)  # fillers fit up to cell 961
    # A grid of 98 has a cell boundary at 980, past 961 (the layout is the same).
    grid = attrs.evolve(padded, options=GRID_FEEDING, flash_attn=True, prefill_chunk=98)
    prompt = list(range(3000, 3000 + 990))
    async with erllama.open_engine(cached(tmp_path)) as engine:
        mid = await engine.load_model("smol", grid)
        assert (await ask(engine, mid, prompt)).cache_delta.created  # a row of 980 cells
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", padded))
        async with erllama.open_engine(cached(tmp_path)) as engine:
            mid = await engine.load_model("smol", padded)
            r = await ask(engine, mid, prompt)
            hit = engine.model_info(mid).last_cache_hit
            # The grid's row holds 980 cells; 961 of them are used.
            assert hit is not None and hit.prefix_len == 1024 - 64 + 1 == r.cache_delta.read
            assert answer(r) == await cold(prompt)


async def test_pad_prefill_is_refused_where_it_is_not_measured_exact(
    smol_config: erllama.ModelConfig,
) -> None:
    async with erllama.open_engine(OFF) as engine:
        for options, flash, why in (
            ({"pad_prefill": "yes"}, None, "true or false"),
            ({"pad_prefill": True}, False, "flash attention"),
            ({"pad_prefill": True, "n_ubatch": 32}, None, "n_ubatch"),
        ):
            bad = attrs.evolve(smol_config, options=options, flash_attn=flash)
            with pytest.raises(erllama.ConfigError, match=why):
                await engine.load_model("bad", bad)
        # Unset, the option pads only where that is exact: these load, on the grid.
        for fine in (
            attrs.evolve(smol_config, flash_attn=False),
            attrs.evolve(smol_config, n_ubatch=32),
        ):
            await engine.unload_model(await engine.load_model("fine", fine))
