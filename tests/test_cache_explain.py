"""Why a prompt missed: every cause produced on purpose and reported as such, in
``Stats.cache_explain`` and by ``Engine.explain_prefix`` (docs/caching.md, "Why did it
miss?")."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import erllama
from erllama.plugins import BackendRegistry

from .helpers import stub_config

pytestmark = pytest.mark.anyio

POLICY = erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000)
#: Stub word tokens (ids 260 and up are words): prompts as ids, so positions are exact.
A = list(range(300, 340))  # 40 tokens
B = list(range(500, 520))


def rows_only(**options: Any) -> erllama.ModelConfig:
    """Live-KV reuse off: every warm start is a cache row."""
    return stub_config(keep_live_kv=False, **options)


@pytest.fixture
async def cached(registry: BackendRegistry) -> AsyncIterator[erllama.Engine]:
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None, policy=POLICY))
    async with erllama.open_engine(cfg, backends=registry) as eng:
        yield eng


async def run(engine: erllama.Engine, mid: str, prompt: list[int]) -> erllama.CacheExplanation:
    """Explain ``prompt`` without running it, run it, and check both say the same."""
    before = await engine.explain_prefix(mid, prompt)
    done = await engine.complete(mid, prompt, max_tokens=2)
    assert done.stats.cache_explain == before
    await engine.wait_saved()
    return before


async def test_a_first_prompt_finds_no_row(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", rows_only())
    ex = await run(cached, mid, A)
    assert ex == erllama.CacheExplanation(
        prompt_tokens=40, restored=0, tier=None, matched=0, cause="no_row", grid=1
    )


async def test_an_exact_hit_has_no_cause(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", rows_only())
    await cached.prefill_only(mid, A)
    await cached.wait_saved()
    ex = await run(cached, mid, A)
    assert (ex.cause, ex.matched, ex.restored, ex.tier, ex.position) == (None, 40, 39, "ram", None)


async def test_a_prompt_that_diverges_names_the_position_and_both_sides(
    cached: erllama.Engine,
) -> None:
    mid = await cached.load_model("m", rows_only())
    key = await cached.prefill_only(mid, A)
    await cached.wait_saved()
    prompt = [*A[:25], *B]
    ex = await run(cached, mid, prompt)
    assert ex.cause == "diverged"
    assert (ex.position, ex.matched, ex.restored, ex.tier) == (25, 25, 25, "ram")
    assert ex.prompt_ids == tuple(B[:8]) and ex.row_ids == tuple(A[25:33])
    assert ex.shared_text == await cached.detokenize(mid, A[17:25])
    assert ex.prompt_text == await cached.detokenize(mid, B[:8])
    assert ex.row_text == await cached.detokenize(mid, A[25:33])
    assert (ex.row_key, ex.row_tokens, ex.row_tier) == (key, 40, "ram")


async def test_a_prompt_running_past_every_row_extends_it(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", rows_only())
    await cached.prefill_only(mid, A)
    await cached.wait_saved()
    ex = await run(cached, mid, [*A, *B])
    assert ex.cause == "extends"
    assert (ex.position, ex.matched, ex.restored, ex.row_ids) == (40, 40, 40, ())
    assert ex.prompt_ids == tuple(B[:8])


async def test_an_evicted_row_is_named_with_when_and_why(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", rows_only())
    key = await cached.prefill_only(mid, A)
    await cached.wait_saved()
    t0 = time.time()
    assert cached.gc() == 1
    t1 = time.time()
    ex = await run(cached, mid, [*A, *B])
    assert ex.cause == "evicted" and ex.evicted_because == "gc"
    assert ex.evicted_at is not None and t0 <= ex.evicted_at <= t1
    assert (ex.position, ex.matched, ex.restored, ex.row_key) == (40, 40, 0, key)


async def test_a_row_of_other_weights_is_a_fingerprint_miss(cached: erllama.Engine) -> None:
    a = await cached.load_model("a", rows_only())
    b = await cached.load_model("b", rows_only(n_vocab=40_000))  # other weights
    await cached.prefill_only(a, A)
    await cached.wait_saved()
    ex = await run(cached, b, [*A, *B])
    assert ex.cause == "fingerprint"
    assert (ex.position, ex.matched, ex.restored) == (40, 40, 0)
    assert ex.row_fingerprint == cached.model_info(a).fingerprint
    assert ex.row_ids == ()  # another model's tokens are not decoded with this vocabulary


async def test_a_row_under_another_kv_layout_is_a_layout_miss(cached: erllama.Engine) -> None:
    a = await cached.load_model("a", rows_only())
    c = await cached.load_model("c", rows_only(n_ctx=1024))
    await cached.prefill_only(a, A)
    await cached.wait_saved()
    ex = await run(cached, c, A)
    assert (ex.cause, ex.matched, ex.restored, ex.position) == ("layout", 40, 0, None)


async def test_a_row_under_the_model_without_its_adapter_is_an_adapter_miss(
    cached: erllama.Engine, tmp_path: Path
) -> None:
    a = await cached.load_model("a", rows_only())
    await cached.prefill_only(a, A)
    await cached.wait_saved()
    adapter = tmp_path / "ad.bin"
    adapter.write_bytes(b"STUBLORA-x")
    await cached.load_adapter(a, str(adapter))
    ex = await run(cached, a, A)
    assert (ex.cause, ex.matched, ex.restored) == ("adapter", 40, 0)
    assert ex.row_fingerprint == cached.model_info(a).fingerprint  # the base one


async def test_a_salted_request_is_told_nothing_of_other_namespaces(
    cached: erllama.Engine,
) -> None:
    a = await cached.load_model("a", rows_only())
    await cached.prefill_only(a, A)
    await cached.wait_saved()
    ex = await cached.explain_prefix(a, A, cache_salt="tenant-2")
    assert ex == erllama.CacheExplanation(
        prompt_tokens=40, restored=0, tier=None, matched=0, cause="no_row", grid=1
    )
    done = await cached.complete(a, A, max_tokens=2, cache_salt="tenant-2")
    assert done.stats.cache_explain == ex


async def test_a_row_too_short_to_be_worth_restoring_is_a_policy_miss(
    registry: BackendRegistry,
) -> None:
    policy = attrs.evolve(POLICY, min_tokens=32)
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None, policy=policy))
    async with erllama.open_engine(cfg, backends=registry) as eng:
        mid = await eng.load_model("m", rows_only())
        await eng.prefill_only(mid, A)
        await eng.wait_saved()
        ex = await run(eng, mid, [*A[:20], *B])  # shares 20 < min_tokens
        assert (ex.cause, ex.position, ex.matched, ex.restored) == ("policy", 20, 20, 0)
        assert ex.row_ids == tuple(A[20:28])


async def test_a_follow_up_turn_past_the_kept_cells_is_a_grid_miss(
    cached: erllama.Engine,
) -> None:
    """Under the exactness rule a request keeps its prompt's whole grid cells only: the
    next turn matches its reply too, and "grid" says that is why the restore stops."""
    mid = await cached.load_model("m", stub_config(batch_invariant=False, prefill_chunk=8))
    prompt = A[:20]
    first = await cached.complete(mid, prompt, max_tokens=3)
    await cached.wait_saved()
    context = list(first.context_tokens)
    assert len(context) > 20
    # A client that changed the reply: the prompt left what was computed inside it.
    changed = [*prompt, context[20], *B]
    ex = await cached.explain_prefix(mid, changed)
    assert (ex.cause, ex.restored, ex.tier, ex.position) == ("grid", 16, "live", 21)
    assert ex.prompt_ids == tuple(B[:8]) and ex.row_ids == tuple(context[21:29])
    # The whole reply sent back: it matched to its end.
    ex = await run(cached, mid, [*context, *B])
    assert ex.cause == "grid" and ex.grid == 8
    assert (ex.restored, ex.tier) == (16, "live")
    assert (ex.position, ex.matched, ex.row_ids) == (len(context), len(context), ())


async def test_with_the_cache_off_a_cold_prompt_says_so(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", rows_only())
    done = await engine.complete(mid, A, max_tokens=2)
    assert done.stats.cache_explain == erllama.CacheExplanation(
        prompt_tokens=40, restored=0, tier=None, matched=0, cause="disabled", grid=1
    )
    assert (await engine.explain_prefix(mid, A)).cause == "disabled"
