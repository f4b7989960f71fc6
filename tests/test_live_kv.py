"""A finished request's KV stays in its sequence; the next prompt reuses the common prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

import erllama
from erllama.backends import Prefill
from erllama.plugins import BackendRegistry

from .helpers import cold_run, metered, release, stub_config

pytestmark = pytest.mark.anyio


def prefills(ctl: object) -> list[tuple[int, ...]]:
    return [tuple(op.tokens) for ops in ctl.history for op in ops if isinstance(op, Prefill)]  # type: ignore[attr-defined]


async def test_a_following_prompt_prefills_only_what_the_live_kv_lacks(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    release(ctl, 10_000)
    mid = await engine.load_model("m", stub_config(control=ctl))
    p1 = await engine.tokenize(mid, "the first turn of a long conversation")
    r1 = await engine.complete(mid, p1, max_tokens=4)
    p2 = [*p1, *r1.token_ids, 300, 301, 302]
    before = len(prefills(ctl))
    r2 = await engine.complete(mid, p2, max_tokens=5)
    assert prefills(ctl)[before:] == [(300, 301, 302)]
    assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == len(p1) + 4
    assert engine.model_info(mid).last_cache_hit == erllama.CacheHit(
        kind="partial", prefix_len=len(p1) + 4, source="live"
    )
    assert r2.token_ids == (await cold_run(registry, p2, max_tokens=5)).token_ids


async def test_an_exact_resend_redecodes_only_the_last_token(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    release(ctl, 10_000)
    mid = await engine.load_model("m", stub_config(control=ctl))
    p1 = await engine.tokenize(mid, "say something")
    r1 = await engine.complete(mid, p1, max_tokens=4)
    resent = [*p1, *r1.token_ids]
    before = len(prefills(ctl))
    r2 = await engine.complete(mid, resent, max_tokens=3)
    assert prefills(ctl)[before:] == [(resent[-1],)]
    assert r2.cache_hit_kind == "exact"
    assert r2.token_ids == (await cold_run(registry, resent, max_tokens=3)).token_ids


async def test_a_diverging_prompt_keeps_only_the_common_prefix(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    mid = await engine.load_model("m", stub_config())
    shared = [1, *range(300, 340)]
    await engine.complete(mid, [*shared, 341, 342, 343], max_tokens=3)
    r = await engine.complete(mid, [*shared, 999, 998], max_tokens=3)
    assert r.cache_delta.read == len(shared)
    assert r.token_ids == (await cold_run(registry, [*shared, 999, 998], max_tokens=3)).token_ids
    # A prefix too short to matter (under min_tokens) is not reused.
    short = await engine.complete(mid, [1, 300, 301, 7], max_tokens=2)
    assert short.cache_hit_kind == "cold"


async def test_live_kv_is_not_reused_across_adapter_sets_or_when_off(
    engine: erllama.Engine, tmp_path: Path
) -> None:
    mid = await engine.load_model("m", stub_config())
    p = await engine.tokenize(mid, "keep it warm")
    r = await engine.complete(mid, p, max_tokens=3)
    adapter = tmp_path / "a.bin"
    adapter.write_bytes(b"STUBLORA-live")
    await engine.load_adapter(mid, str(adapter))
    assert (await engine.complete(mid, [*p, *r.token_ids], max_tokens=2)).cache_hit_kind == "cold"
    off = await engine.load_model("off", stub_config(keep_live_kv=False))
    r = await engine.complete(off, p, max_tokens=3)
    assert (await engine.complete(off, [*p, *r.token_ids], max_tokens=2)).cache_hit_kind == "cold"


async def test_with_two_sequences_a_prompt_lands_where_its_prefix_lives(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config(n_seq_max=2))
    a = [1, *range(300, 340)]
    b = [1, *range(500, 540)]
    ra = await engine.complete(mid, a, max_tokens=2)
    await engine.complete(mid, b, max_tokens=2)  # lands on the other, empty sequence
    again = await engine.complete(mid, [*a, *ra.token_ids, 7], max_tokens=2)
    assert again.stats.cache_delta.read == len(a) + 2


async def test_live_hits_are_counted_apart_from_cache_hits(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=tmp_path / "d")
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        p = await engine.tokenize(mid, "one two three four five six seven eight nine ten")
        r = await engine.complete(mid, p, max_tokens=3)
        await engine.complete(mid, [*p, *r.token_ids, 300], max_tokens=2)
        c = engine.cache_counters()
        assert c.hits_live == 1 and c.hits == 0 and c.misses == 1
