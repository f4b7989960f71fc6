"""In-flight prefix sharing on SmolLM2 (issue 22): requests that arrive together with one
system prompt prefill it once, and each answers as a cold run of its prompt alone does.

The reference is a fresh engine with the cache off, no live reuse and one sequence: every
prompt there is prefilled by itself from position 0. The followers take the leader's cells
of the shared prefix in whole grid cells (docs/caching.md "Exactness"), which a cold
prefill computes bit for bit, so their first token always equals the reference's; the whole
answer does with ``flash_attn=False`` (with flash attention on, concurrent decoding itself
can change a generated token past 256 cells, sharing or not: docs/caching.md).
"""

from __future__ import annotations

import attrs
import pytest

import erllama

from ..helpers import common_prefix_len
from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio

OFF = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
GRID = 64
SYSTEM = (
    "You are the assistant of a harbour office. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros, children travel free, bicycles cost three euros. The office "
    "opens at half past six and closes after the last ferry. Lost property is kept for a "
    "month. Dogs are welcome on the outer deck. The crossing takes forty minutes. "
) * 6
QUESTIONS = [
    "When does the first ferry leave?",
    "Can I bring my dog?",
    "How long is the crossing?",
    "Do bicycles cost extra?",
]


async def together(
    config: erllama.ModelConfig, max_tokens: int
) -> tuple[list[list[int]], list[erllama.Completion]]:
    """The four chats queued at once on one engine (the first prefills for about a second,
    so the others are admitted while it does): their prompts and results."""
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", config)
        prompts = [
            await engine.apply_chat_template(mid, [{"role": "user", "content": q}], SYSTEM)
            for q in QUESTIONS
        ]
        streams = [await engine.infer(mid, p, max_tokens=max_tokens) for p in prompts]
        done = []
        for s in streams:
            async with s:
                done.append(await s.collect())
        return prompts, done


async def cold(config: erllama.ModelConfig, prompt: list[int], max_tokens: int) -> tuple[int, ...]:
    alone = attrs.evolve(config, n_seq_max=1, keep_live_kv=False, share_prefill=False)
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("cold", alone)
        return (await engine.complete(mid, prompt, max_tokens=max_tokens)).token_ids


def check_sharing(prompts: list[list[int]], done: list[erllama.Completion]) -> None:
    """The first prompt prefilled alone; every other took the whole grid cells it shares
    with the first from its sequence."""
    assert done[0].cache_hit_kind == "cold"
    assert len(prompts[0]) > 400
    for p, d in zip(prompts[1:], done[1:], strict=True):
        shared = common_prefix_len(p, prompts[0]) // GRID * GRID
        assert shared >= 384
        assert (d.cache_hit_kind, d.cache_delta.read) == ("partial", shared)


async def test_four_chats_arriving_together_share_the_system_prompt_exactly(
    smol_config: erllama.ModelConfig,
) -> None:
    config = attrs.evolve(smol_config, n_seq_max=4, n_batch=256, flash_attn=False)
    prompts, done = await together(config, max_tokens=12)
    check_sharing(prompts, done)
    for p, d in zip(prompts, done, strict=True):
        assert d.token_ids == await cold(config, p, 12)


async def test_with_flash_attention_the_first_tokens_equal_the_cold_runs(
    smol_config: erllama.ModelConfig,
) -> None:
    config = attrs.evolve(
        smol_config, n_seq_max=4, n_batch=256, flash_attn=True, options=GRID_FEEDING
    )
    prompts, done = await together(config, max_tokens=1)
    check_sharing(prompts, done)
    for p, d in zip(prompts, done, strict=True):
        assert d.token_ids == await cold(config, p, 1)
