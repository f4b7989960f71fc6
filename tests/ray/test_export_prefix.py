"""``Engine.export_prefix``: the row a replica hands over when another lacks a prefix it
holds (no Ray here: two engines in one process)."""

from __future__ import annotations

import pytest

import erllama
from erllama.plugins import BackendRegistry

from ..helpers import cold_run, stub_config, words

pytestmark = pytest.mark.anyio

RAM = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None))


async def test_the_row_for_a_prompts_longest_cached_prefix_restores_elsewhere(
    registry: BackendRegistry,
) -> None:
    async with erllama.open_engine(RAM, backends=registry) as a:
        mid = await a.load_model("m", stub_config(keep_live_kv=False))
        first = await a.complete(mid, words(40), max_tokens=4)
        prompt = [*first.context_tokens, 300, 301]  # the conversation's next turn
        held = await a.longest_cached_prefix(mid, prompt)
        data = await a.export_prefix(mid, prompt)
    assert held.tokens == len(first.context_tokens) and data is not None
    async with erllama.open_engine(RAM, backends=registry) as b:
        mid = await b.load_model("m", stub_config())
        await b.import_row(data)
        warm = await b.complete(mid, prompt, max_tokens=5)
    assert warm.stats.cache_delta.read == len(first.context_tokens)
    assert warm.token_ids == (await cold_run(registry, prompt, max_tokens=5)).token_ids


async def test_nothing_to_export_without_a_cached_prefix(registry: BackendRegistry) -> None:
    async with erllama.open_engine(RAM, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        assert await engine.export_prefix(mid, [1, 300, 301]) is None
        with pytest.raises(erllama.InvalidRequest):
            await engine.export_prefix(mid, [-1])
        with pytest.raises(erllama.ModelNotFound):
            await engine.export_prefix("nope", [1])
