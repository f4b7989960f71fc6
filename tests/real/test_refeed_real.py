"""Feeding a finished reply again while the model is idle (ModelConfig.refeed_replies), on
SmolLM2: the next turn restores the reply's whole grid cells, and its greedy answer is the
answer of a cold run of the same prompt on an engine of its own (cache off, no live KV)."""

from __future__ import annotations

import anyio
import attrs
import pytest

import erllama

from .grid import GRID_FEEDING

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

GRID = 64
SYSTEM = (
    "You are the assistant of a harbour office. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros, children travel free, bicycles cost three euros. "
) * 3
OFF = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
#: The RAM tier only: ``explain_prefix`` (which the test polls) answers with the cache on.
RAM = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None))


async def restorable(engine: erllama.Engine, mid: str, prompt: list[int], want: int) -> int:
    """What ``prompt`` would restore, once the model has fed the reply again (bounded)."""
    with anyio.fail_after(60):
        while True:
            found = (await engine.explain_prefix(mid, prompt)).restored
            if found >= want:
                return found
            await anyio.sleep(0.05)


@pytest.mark.parametrize("feeding", [GRID_FEEDING, {}], ids=["grid", "padded"])
async def test_the_next_turn_restores_the_reply_fed_again_and_answers_as_a_cold_run(
    smol_config: erllama.ModelConfig, feeding: dict[str, bool]
) -> None:
    """On the grid the reply's whole cells are fed again; with padded chunks (the default)
    all of it, in whole chunks, so the next turn restores everything before its new
    message."""
    config = attrs.evolve(smol_config, prefill_chunk=GRID, options=feeding, refeed_replies=True)
    cell = GRID if feeding == GRID_FEEDING else 1  # what a reuse is rounded down to
    first = [{"role": "user", "content": "Name three things to bring on a ferry trip."}]
    async with erllama.open_engine(RAM) as engine:
        mid = await engine.load_model("smol", config)
        p1 = await engine.apply_chat_template(mid, first, SYSTEM)
        r1 = await engine.complete(mid, p1, max_tokens=80)
        assert r1.text
        history = [
            *first,
            {"role": "assistant", "content": r1.text},
            {"role": "user", "content": "And when does the last ferry leave?"},
        ]
        p2 = await engine.apply_chat_template(mid, history, SYSTEM)
        computed = list(r1.context_tokens)
        assert p2[: len(computed)] == computed  # the reply is replayed exactly
        # Without feeding the reply again only the first prompt's whole cells are kept.
        kept = len(p1) // cell * cell
        want = len(computed) // cell * cell
        assert want > kept, "the reply must reach past the prompt's last whole cell"
        assert await restorable(engine, mid, p2, want) == want
        r2 = await engine.complete(mid, p2, max_tokens=24)
        assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == want
    cold_config = attrs.evolve(smol_config, prefill_chunk=GRID, options=feeding, keep_live_kv=False)
    async with erllama.open_engine(OFF) as cold:
        cid = await cold.load_model("cold", cold_config)
        reference = await cold.complete(cid, p2, max_tokens=24)
        assert reference.cache_hit_kind == "cold"
    assert r2.token_ids == reference.token_ids


async def test_a_request_arriving_meanwhile_goes_first(smol_config: erllama.ModelConfig) -> None:
    # Another conversation's request while a long reply is fed again: it runs as it would,
    # and the reply being fed again never changes its answer.
    config = attrs.evolve(
        smol_config, prefill_chunk=GRID, options=GRID_FEEDING, refeed_replies=True, n_seq_max=2
    )
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", config)
        p1 = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "Write a long story about a lighthouse."}], SYSTEM
        )
        await engine.complete(mid, p1, max_tokens=200)
        other = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "Name a colour."}], None
        )
        r = await engine.complete(mid, other, max_tokens=12)
    cold_config = attrs.evolve(
        smol_config, prefill_chunk=GRID, options=GRID_FEEDING, keep_live_kv=False
    )
    async with erllama.open_engine(OFF) as cold:
        cid = await cold.load_model("cold", cold_config)
        assert (await cold.complete(cid, other, max_tokens=12)).token_ids == r.token_ids
