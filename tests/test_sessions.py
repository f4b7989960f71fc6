"""Sessions, prefill_only, and the routing and operator calls (stub, asyncio and trio)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import erllama
from erllama.backends import Prefill
from erllama.backends.stub import StubControl

from .helpers import metered, release, stub_config, wait_for, words

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cached(registry: erllama.plugins.BackendRegistry, tmp_path: Path) -> erllama.Engine:  # type: ignore[misc]
    policy = erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000)
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=tmp_path / "shm", disk_dir=None, policy=policy)
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        yield engine


# ---- sessions -------------------------------------------------------------------------------


async def test_a_session_feeds_only_what_its_next_prompt_adds(engine: erllama.Engine) -> None:
    ctl = StubControl()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2))
    first = await engine.complete(mid, words(12), max_tokens=3, session_id="chat-1")
    info = engine.model_info(mid)
    assert [s.id for s in info.sessions] == ["chat-1"]
    assert info.sessions[0].tokens == len(first.context_tokens)
    follow_up = [
        *first.context_tokens,
        *await engine.tokenize(mid, words(3, 50), add_special=False),
    ]
    ctl.history.clear()
    second = await engine.complete(mid, follow_up, max_tokens=3, session_id="chat-1")
    hit = second.stats.cache_delta.read
    assert hit == len(first.context_tokens)
    assert engine.model_info(mid).last_cache_hit.source == "session"  # type: ignore[union-attr]
    fed = sum(len(op.tokens) for ops in ctl.history for op in ops if isinstance(op, Prefill))
    assert fed == len(follow_up) - hit


async def test_a_session_serves_one_request_at_a_time(engine: erllama.Engine) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2))
    running = await engine.infer(mid, words(5), max_tokens=3, session_id="s")
    with pytest.raises(erllama.SessionBusy) as exc:
        await engine.infer(mid, words(6), max_tokens=3, session_id="s")
    assert exc.value.session_id == "s" and exc.value.model_id == mid
    release(ctl, 100)
    await running.collect()
    assert (await engine.complete(mid, words(6), max_tokens=2, session_id="s")).token_ids


async def test_pinned_sessions_hold_sequences_until_ended(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(n_seq_max=2))
    await engine.complete(mid, words(5), max_tokens=2, session_id="a")
    await engine.complete(mid, words(5, 9), max_tokens=2, session_id="b")
    assert {s.id for s in engine.model_info(mid).sessions} == {"a", "b"}
    await engine.end_session(mid, "a")
    await engine.end_session(mid, "a")  # idempotent
    await engine.end_session(mid, "nobody")
    assert [s.id for s in engine.model_info(mid).sessions] == ["b"]


async def test_a_waiting_request_takes_an_idle_sessions_sequence(
    cached: erllama.Engine,
) -> None:
    mid = await cached.load_model("m", stub_config(n_seq_max=1))
    first = await cached.complete(mid, words(12), max_tokens=3, session_id="s")
    # The one sequence is pinned; another request must not wait for end_session forever.
    with anyio.fail_after(5):
        other = await cached.complete(mid, words(8, 100), max_tokens=2)
    assert other.finish_reason == "length"
    assert cached.model_info(mid).sessions == ()
    # The session's state was saved before it gave the sequence up (here its finish row
    # already held it) ...
    rows = {p.tokens for p in cached.list_cached_prefixes(mid)}
    assert len(first.context_tokens) in rows
    # ... so the session's next request comes back warm from the cache.
    follow_up = [*first.context_tokens, 300, 301]
    again = await cached.complete(mid, follow_up, max_tokens=2, session_id="s")
    assert again.stats.cache_delta.read == len(first.context_tokens)


async def test_an_idle_session_expires_after_its_ttl(cached: erllama.Engine) -> None:
    mid = await cached.load_model(
        "m", erllama.ModelConfig(backend="stub", n_ctx=512, session_ttl_s=0.2)
    )
    first = await cached.complete(mid, words(12), max_tokens=2, session_id="s")
    assert [s.id for s in cached.model_info(mid).sessions] == ["s"]
    # A wall-clock wait on purpose: the TTL running out is what this test is about.
    await wait_for(lambda: not cached.model_info(mid).sessions, within=5, what="the expiry")
    # Its state stays (until another request needs the sequence) live: the same prompt
    # without the session is an exact hit on it, and says the same.
    again = await cached.complete(mid, words(12), max_tokens=2)
    prompt = await cached.tokenize(mid, words(12))
    assert cached.model_info(mid).last_cache_hit == erllama.CacheHit(
        kind="exact", prefix_len=len(prompt) - 1, source="live"
    )
    assert again.token_ids == first.token_ids


async def test_bad_session_ids_are_invalid_requests(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    for bad in ("", 7, "x" * 300):
        with pytest.raises(erllama.InvalidRequest) as exc:
            await engine.infer(mid, "hi", session_id=bad)  # type: ignore[arg-type]
        assert exc.value.param == "session_id"


# ---- prefill_only ---------------------------------------------------------------------------


async def test_prefill_only_saves_a_row_and_returns_its_key(cached: erllama.Engine) -> None:
    ctl = StubControl()
    mid = await cached.load_model("m", stub_config(control=ctl, keep_live_kv=False))
    prompt = await cached.tokenize(mid, words(20))
    key = await cached.prefill_only(mid, prompt)
    assert key is not None
    assert not any(
        isinstance(op, erllama.backends.Decode) for ops in ctl.history for op in ops
    )  # nothing was generated
    r = await cached.complete(mid, [*prompt, 400, 401], max_tokens=2)
    assert r.cache_hit_kind == "partial" and r.stats.cache_delta.read == len(prompt)
    resumed = await cached.complete(mid, [*prompt, 400, 401], max_tokens=2, parent_key=key)
    assert resumed.cache_hit_kind == "partial"
    assert cached.cache_counters().hits_resume == 1


async def test_prefill_only_saves_below_the_policys_minimum_too(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", stub_config())
    key = await cached.prefill_only(mid, [1, 300])  # min_tokens is 4
    assert key is not None
    row = cached.cache_row(key)
    assert row is not None and (row.tokens, row.status) == ((1, 300), "available")


async def test_prefill_only_without_a_cache_returns_none(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    assert await engine.prefill_only(mid, words(5)) is None


# ---- routing queries and operator calls ----------------------------------------------------------


async def test_longest_cached_prefix_reports_rows_and_live_kv_without_loading(
    cached: erllama.Engine,
) -> None:
    mid = await cached.load_model("m", stub_config(n_seq_max=2))
    prompt = await cached.tokenize(mid, words(20))
    r = await cached.complete(mid, prompt, max_tokens=3)
    longer = [*r.context_tokens, 300]
    before = cached.cache_counters()
    found = await cached.longest_cached_prefix(mid, longer)
    # The finish row and the live KV hold the same tokens: the row is the one reported.
    assert (found.tokens, found.tier) == (len(r.context_tokens), "ram")
    assert cached.cache_counters().lookups == before.lookups  # nothing was looked up
    rows = cached.list_cached_prefixes(mid)
    assert any(p.tokens == len(r.context_tokens) and p.tier == "ram" for p in rows)
    assert all(p.key is not None for p in rows)
    none = await cached.longest_cached_prefix(mid, [5, 6, 7])
    assert none.tokens == 0 and none.tier is None


async def test_queue_depth_counts_queued_and_running_requests(engine: erllama.Engine) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    other = await engine.load_model("other", stub_config())
    streams = [await engine.infer(mid, [1, 300 + i], max_tokens=2) for i in range(3)]
    assert engine.queue_depth() == 3 and engine.queue_depth(mid) == 3
    assert engine.queue_depth(other) == 0
    release(ctl, 100)
    for s in streams:
        await s.collect()
    assert engine.queue_depth() == 0


async def test_operator_calls_gc_evict_bytes_reset_and_save_all(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", stub_config(n_seq_max=2))
    for i in range(3):
        await cached.complete(mid, words(10, i * 50), max_tokens=2)
    assert cached.cache_counters().rows_ram == 3
    # Both sequences' live KV is in the cache (their finish rows hold exactly it).
    assert await cached.save_all(mid) == 2
    assert cached.cache_counters().saves_evict == 0  # nothing needed packing
    rows, freed = cached.evict_bytes(1)
    assert rows == 1 and freed > 0
    assert cached.gc() == 2 and cached.cache_counters().rows_ram == 0
    cached.reset_counters()
    c = cached.cache_counters()
    assert c.saves_finish == 0 and c.evictions == 0
    with pytest.raises(erllama.InvalidRequest):
        cached.evict_bytes(-1)


async def test_save_all_saves_running_requests(cached: erllama.Engine) -> None:
    ctl = metered()
    mid = await cached.load_model("m", stub_config(control=ctl))
    stream = await cached.infer(mid, words(10), max_tokens=50)
    release(ctl, 3)
    await wait_for(lambda: ctl.steps == 4 and ctl.waiting == 1)
    async with anyio.create_task_group() as tg:
        saved: list[int] = []

        async def save() -> None:
            saved.append(await cached.save_all(mid))

        tg.start_soon(save)
        await anyio.wait_all_tasks_blocked()
        assert saved == []  # queued for the thread, which is parked mid-step
        release(ctl, 1)
    assert saved == [1]
    stream.cancel()
    release(ctl, 1000)
    await stream.collect()


async def test_vram_info_is_empty_without_a_gpu(
    engine: erllama.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert await engine.vram_info() == []
