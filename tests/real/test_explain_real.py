"""On SmolLM2 (llama.cpp, a prefill grid of 8): a follow-up turn's miss is "grid", and a
client that changed the reply is shown where it left what the model wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest

import erllama

from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio

SYSTEM = (
    "You are a helpful assistant who answers briefly and precisely, in plain English, "
    "about geography and history."
)


@pytest.fixture
async def cached_engine() -> AsyncIterator[erllama.Engine]:
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None))
    async with erllama.open_engine(cfg) as engine:
        yield engine


async def test_a_follow_up_turn_is_a_grid_miss_at_the_new_message(
    cached_engine: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    engine = cached_engine
    mid = await engine.load_model(
        "smol", attrs.evolve(smol_config, prefill_chunk=8, options=GRID_FEEDING)
    )
    first = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Capital of France?"},
    ]
    p1 = await engine.apply_chat_template(mid, first)
    r1 = await engine.complete(mid, p1, max_tokens=16)
    assert r1.stats.cache_explain is not None and r1.stats.cache_explain.cause == "no_row"
    kept = len(p1) // 8 * 8
    computed = len(r1.context_tokens)  # prompt, reply and end-of-generation token

    def turn(reply: str) -> list[dict[str, str]]:
        return [
            *first,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And of Italy?"},
        ]

    p2 = await engine.apply_chat_template(mid, turn(r1.text))
    common = next(
        (i for i, (a, b) in enumerate(zip(p2, r1.context_tokens, strict=False)) if a != b),
        computed,
    )
    ex = await engine.explain_prefix(mid, p2)
    assert (ex.cause, ex.restored, ex.tier, ex.grid) == ("grid", kept, "live", 8)
    assert ex.matched == ex.position == common > kept
    assert ex.prompt_ids == tuple(p2[common : common + 8])
    assert ex.row_ids == tuple(r1.context_tokens[common : common + 8])
    # A client that cut the reply short: the prompt leaves the model's reply inside it.
    cut = r1.text.strip()[:-3]
    p3 = await engine.apply_chat_template(mid, turn(cut))
    left = next(i for i, (a, b) in enumerate(zip(p3, r1.context_tokens, strict=False)) if a != b)
    assert len(p1) < left < computed
    ex = await engine.explain_prefix(mid, p3)
    assert (ex.cause, ex.restored, ex.position) == ("grid", kept, left)
    assert ex.row_ids == tuple(r1.context_tokens[left : left + 8]) != ()
    r3 = await engine.complete(mid, p3, max_tokens=4)
    assert r3.stats.cache_explain == ex
