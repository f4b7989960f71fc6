"""The KV cache through the engine, on the stub: hits, saves, tiers, budgets, recovery."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama.cache.tiers import FileTier
from erllama.plugins import BackendRegistry

from .helpers import cold_run, metered, release, unblock_stubs, wait_for, words
from .helpers import stub_config as _stub_config


def stub_config(**options: Any) -> erllama.ModelConfig:
    """These tests pin the cache itself: live-KV reuse off, so every warm start is a row."""
    return _stub_config(keep_live_kv=False, **options)


pytestmark = pytest.mark.anyio

POLICY = erllama.CachePolicy(
    min_tokens=4,
    cold_min_tokens=16,
    boundary_trim_tokens=4,
    boundary_align_tokens=8,
    continued_interval=1000,
)


def cache_cfg(tmp_path: Path, **kw: Any) -> erllama.EngineConfig:
    fields: dict[str, Any] = {
        "ram_file_dir": tmp_path / "shm",
        "disk_dir": tmp_path / "disk",
        "policy": POLICY,
        "sweep_interval_s": 3600.0,
    }
    fields.update(kw)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))


def hold(monkeypatch: pytest.MonkeyPatch, method: str) -> threading.Event:
    """Make every ``FileTier.<method>`` call wait (at most 10 s) until the event is set."""
    gate = threading.Event()
    original = getattr(FileTier, method)

    def held(self: FileTier, *a: Any) -> Any:
        gate.wait(10)
        return original(self, *a)

    monkeypatch.setattr(FileTier, method, held)
    return gate


@pytest.fixture
async def cached(registry: BackendRegistry, tmp_path: Path) -> AsyncIterator[erllama.Engine]:
    async with erllama.open_engine(cache_cfg(tmp_path), backends=registry) as engine:
        try:
            yield engine
        finally:
            unblock_stubs()


async def test_resending_a_conversation_hits_exactly_and_continues_identically(
    cached: erllama.Engine, registry: BackendRegistry
) -> None:
    mid = await cached.load_model("m", stub_config())
    prompt = await cached.tokenize(mid, words(40))
    first = await cached.complete(mid, prompt, max_tokens=6)
    assert first.cache_hit_kind == "cold" and first.finish_key is not None
    assert first.cache_delta == erllama.CacheDelta(read=0, created=len(prompt) + 6)
    resent = [*prompt, *first.token_ids]
    warm = await cached.complete(mid, resent, max_tokens=8)
    assert warm.cache_hit_kind == "exact"
    # All but the last token restored: it is fed again for the logits a state lacks.
    assert warm.cache_delta.read == len(resent) - 1
    assert warm.token_ids == (await cold_run(registry, resent, max_tokens=8)).token_ids
    c = cached.cache_counters()
    assert c.hits_exact == 1 and c.misses == 1 and c.saves_finish == 2 and c.saves_cold == 1
    assert cached.model_info(mid).last_cache_hit == erllama.CacheHit(
        kind="exact", prefix_len=len(resent) - 1, source="exact", tier="ram"
    )


async def test_parent_key_resumes_the_previous_turn(
    cached: erllama.Engine, registry: BackendRegistry
) -> None:
    mid = await cached.load_model("m", stub_config())
    turn1 = await cached.tokenize(mid, words(20))
    r1 = await cached.complete(mid, turn1, max_tokens=5)
    turn2 = [*turn1, *r1.token_ids, *await cached.tokenize(mid, words(7, 500), add_special=False)]
    r2 = await cached.complete(mid, turn2, max_tokens=6, parent_key=r1.finish_key)
    assert r2.cache_hit_kind == "partial"
    assert r2.cache_delta.read == len(turn1) + 5
    assert r2.cache_delta.created == 7 + 6
    assert cached.cache_counters().hits_resume == 1
    assert r2.token_ids == (await cold_run(registry, turn2, max_tokens=6)).token_ids


async def test_longest_prefix_finds_a_shared_system_prompt(
    cached: erllama.Engine, registry: BackendRegistry
) -> None:
    mid = await cached.load_model("m", stub_config())
    system = words(60)
    a = await cached.complete(mid, system + " " + words(5, 900), max_tokens=4)
    assert a.cache_hit_kind == "cold"
    b_prompt = system + " " + words(6, 1200)
    b = await cached.complete(mid, b_prompt, max_tokens=4)
    assert b.cache_hit_kind == "partial"
    n_a = 1 + 65  # BOS + words
    # a's cold row sits at floor((n - trim) / align) * align, inside the system prompt; a's
    # finish row runs past where b differs from it, so it is restored and trimmed to what
    # they share: BOS and the whole system prompt.
    assert (n_a - 4) // 8 * 8 < 1 + 60
    assert b.cache_delta.read == 1 + 60
    assert cached.cache_counters().hits_longest_prefix == 1
    assert b.token_ids == (await cold_run(registry, b_prompt, max_tokens=4)).token_ids


async def test_a_prompt_that_ends_inside_a_row_restores_all_of_itself(
    cached: erllama.Engine, registry: BackendRegistry
) -> None:
    mid = await cached.load_model("m", stub_config())
    long = await cached.tokenize(mid, words(60))
    await cached.complete(mid, long, max_tokens=4)
    # Every row is longer than ``short`` (the cold row ends at 56, the finish row at 65):
    # none is a prefix of it, but the first 50 tokens of the shorter one are all of it.
    short = long[:50]
    found = await cached.longest_cached_prefix(mid, short)
    assert (found.tokens, found.tier) == (50, "ram") and found.key is not None
    r = await cached.complete(mid, short, max_tokens=6)
    assert (r.cache_hit_kind, r.cache_delta.read) == ("exact", 49)  # its last token re-fed
    assert r.token_ids == (await cold_run(registry, short, max_tokens=6)).token_ids


async def test_a_row_mostly_past_the_shared_part_is_not_restored(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", stub_config())
    system = words(12)
    # The only rows sharing the system prompt run 300 tokens past it: restoring one to keep
    # 13 tokens reads more than COVER_MAX_EXCESS times what it saves.
    await cached.complete(mid, system + " " + words(300, 700), max_tokens=2)
    prompt = await cached.tokenize(mid, system + " " + words(8, 1200))
    assert (await cached.longest_cached_prefix(mid, prompt)).tokens == 0  # as the lookup sees it
    r = await cached.complete(mid, prompt, max_tokens=2)
    assert r.cache_hit_kind == "cold"


async def test_a_stale_parent_key_still_falls_back_to_the_walk(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", stub_config())
    system = words(60)
    await cached.complete(mid, system, max_tokens=2)
    r = await cached.complete(mid, system + " " + words(3, 77), parent_key="00" * 32, max_tokens=2)
    assert r.cache_hit_kind == "partial"


async def test_rows_never_cross_models_adapters_or_context_shapes(
    cached: erllama.Engine, tmp_path: Path
) -> None:
    prompt = words(30)
    a = await cached.load_model("a", stub_config())
    b = await cached.load_model("b", stub_config(n_vocab=40_000))  # other weights
    c = await cached.load_model("c", stub_config(n_ctx=1024))  # other KV layout
    r = await cached.complete(a, prompt, max_tokens=3)
    resent = [*await cached.tokenize(a, prompt), *r.token_ids]
    for other in (b, c):
        assert (await cached.complete(other, resent, max_tokens=2)).cache_hit_kind == "cold"
    adapter = tmp_path / "ad.bin"
    adapter.write_bytes(b"STUBLORA-x")
    await cached.load_adapter(a, str(adapter))
    assert (await cached.complete(a, resent, max_tokens=2)).cache_hit_kind == "cold"
    await cached.unload_adapter(a, 1)
    assert (await cached.complete(a, resent, max_tokens=2)).cache_hit_kind == "exact"


async def test_no_continued_saves_and_generated_tokens_are_saved_only_where_exact(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    """Generated tokens' cells come from one-token decodes: on a backend whose cells depend
    on batching (the stub told so), a cold prefill of the same text computes them otherwise,
    so no row holds them; the finish row is the prompt's whole grid cells. (The stub's own
    cells do not depend on batching: its finish rows hold the reply.)"""
    policy = attrs.evolve(POLICY, continued_interval=10)
    done = []
    for i, options in enumerate(({}, {"batch_invariant": False})):
        config = cache_cfg(tmp_path / str(i), policy=policy)
        async with erllama.open_engine(config, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config(prefill_chunk=8, **options))
            prompt = await engine.tokenize(mid, words(20))  # 21 tokens: 2 whole cells of 8
            done.append(await engine.complete(mid, prompt, max_tokens=35))
            assert engine.cache_counters().saves_continued == 0
    a, b = done
    assert a.finish_key is not None and b.finish_key is not None
    assert a.stats.cache_delta.created == len(prompt) + 35
    assert b.stats.cache_delta.created == 16


async def test_evict_saves_in_flight_sequences(cached: erllama.Engine) -> None:
    ctl = metered()
    mid = await cached.load_model("m", stub_config(control=ctl))
    stream = await cached.infer(mid, words(10), max_tokens=50)
    release(ctl, 4)
    await wait_for(lambda: ctl.steps == 5 and ctl.waiting == 1)  # step 5 is parked
    saved: list[int] = []

    async def evict() -> None:
        saved.append(await cached.evict(mid))

    async with anyio.create_task_group() as tg:
        tg.start_soon(evict)
        # The evict save runs between ticks: the blocked step must finish first.
        await anyio.wait_all_tasks_blocked()
        assert saved == []
        release(ctl, 1)
    assert saved == [1]
    assert cached.cache_counters().saves_evict == 1
    release(ctl, 1000)
    events = [ev async for ev in stream]
    assert events[-1].finish_reason == "length"  # type: ignore[union-attr]


async def test_leaving_the_engine_saves_running_requests_and_persists_ram_rows(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    ctl = metered()
    async with erllama.open_engine(cache_cfg(tmp_path), backends=registry) as engine:
        mid = await engine.load_model("m", stub_config(control=ctl))
        stream = await engine.infer(mid, words(12), max_tokens=100)
        release(ctl, 5)
        await wait_for(lambda: ctl.steps == 6 and ctl.waiting == 1)  # step 6 is parked
        # Released once the engine is closing: the request is cancelled after this step.
        threading.Timer(0.05, release, (ctl, 1000)).start()
    done = [ev async for ev in stream][-1]
    assert done.finish_reason == "cancelled" and done.stats.finish_key is not None
    # A new engine finds the row on a file tier (RAM rows were spilled down at exit).
    async with erllama.open_engine(cache_cfg(tmp_path), backends=registry) as engine:
        c = engine.cache_counters()
        assert c.rows_ram == 0 and c.rows_ram_file + c.rows_disk >= 1
        mid = await engine.load_model("m", stub_config())
        row = engine.cache_row(done.stats.finish_key)
        assert row is not None
        resent = list(row.tokens)
        r = await engine.complete(mid, resent, max_tokens=3)
        assert r.cache_hit_kind == "exact"


async def test_a_ram_budget_spills_rows_down_instead_of_losing_them(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    cfg = cache_cfg(tmp_path, ram_bytes=700)  # a stub state of ~40 tokens is ~180 bytes
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        finals = []
        for i in range(8):
            r = await engine.complete(mid, words(30, 100 * i), max_tokens=3)
            finals.append([*await engine.tokenize(mid, words(30, 100 * i)), *r.token_ids])
        await engine.wait_saved()
        c = engine.cache_counters()
        assert c.bytes_ram <= 700
        assert c.spills >= 1 and c.rows_ram_file >= 1 and c.evictions == 0
        # The oldest row now lives on the ram_file tier and still hits.
        r = await engine.complete(mid, finals[0], max_tokens=2)
        assert r.cache_hit_kind == "exact" and r.stats.cache_hit_kind == "exact"
        assert engine.model_info(mid).last_cache_hit.tier == "ram_file"  # type: ignore[union-attr]


async def test_the_last_tier_evicts_least_recently_used_rows_within_budget(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    cfg = cache_cfg(tmp_path, ram_bytes=0, ram_file_dir=None, disk_bytes=1500)
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        for i in range(10):
            await engine.complete(mid, words(30, 100 * i), max_tokens=3)
            await engine.wait_saved()
        c = engine.cache_counters()
        assert c.bytes_disk <= 1500 and c.evictions >= 1
        on_disk = sum(f.stat().st_size for f in (tmp_path / "disk").glob("*.kvc"))
        assert on_disk == c.bytes_disk


async def test_a_full_writer_pool_drops_saves_and_never_stalls_generation(
    registry: BackendRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = hold(monkeypatch, "write_tmp")
    cfg = cache_cfg(tmp_path, ram_bytes=0, ram_file_dir=None, writers=1, writer_queue=0)
    try:
        async with erllama.open_engine(cfg, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config())
            with anyio.fail_after(5):  # generation goes on while the only writer is stuck
                for i in range(4):
                    r = await engine.complete(mid, words(30, 50 * i), max_tokens=2)
                    assert r.finish_reason == "length"
            assert engine.cache_counters().saves_dropped >= 3
            gate.set()
    finally:
        gate.set()


async def test_a_parent_row_still_being_written_is_usable_at_once(
    registry: BackendRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = hold(monkeypatch, "publish")
    cfg = cache_cfg(tmp_path, ram_bytes=0, ram_file_dir=None)
    try:
        async with erllama.open_engine(cfg, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config())
            t1 = await engine.tokenize(mid, words(20))
            r1 = await engine.complete(mid, t1, max_tokens=3)
            assert r1.finish_key is not None
            row = engine.cache_row(r1.finish_key)
            # Reserved, with its bytes, before finish_key was handed out; its file is held.
            assert row is not None and row.status == "writing"
            r2 = await engine.complete(
                mid, [*t1, *r1.token_ids, 300, 301], parent_key=r1.finish_key, max_tokens=2
            )
            assert r2.cache_hit_kind == "partial"
            assert engine.cache_counters().hits_resume == 1
            gate.set()
    finally:
        gate.set()


async def test_a_parent_key_saved_by_another_engine_is_found_on_disk(
    registry: BackendRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish, probe = FileTier.publish, FileTier.probe
    may_publish = threading.Event()
    #: Keys a lookup found still being written (a temp, no row file yet).
    seen_writing: list[bytes] = []

    def held_publish(self: FileTier, *a: Any) -> Any:
        may_publish.wait(30)
        return publish(self, *a)

    def watched_probe(self: FileTier, key: bytes) -> Any:
        meta, writing = probe(self, key)
        if writing:
            seen_writing.append(key)
        return meta, writing

    monkeypatch.setattr(FileTier, "publish", held_publish)
    monkeypatch.setattr(FileTier, "probe", watched_probe)
    # Finish rows only (no cold save): the one publish held is the parent's.
    policy = attrs.evolve(POLICY, resume_wait_s=10.0, cold_min_tokens=10_000)
    cfg = cache_cfg(tmp_path, ram_bytes=0, ram_file_dir=None, policy=policy)
    try:
        async with (
            erllama.open_engine(cfg, backends=registry) as saver,
            erllama.open_engine(cfg, backends=registry) as other,
        ):
            a = await saver.load_model("m", stub_config())
            b = await other.load_model("m", stub_config())
            t1 = await saver.tokenize(a, words(20))
            r1 = await saver.complete(a, t1, max_tokens=3)
            assert r1.finish_key is not None
            # The saver is publishing now: its temp exists, the row file does not yet.
            await wait_for(lambda: any((tmp_path / "disk").glob(f"{r1.finish_key}.kvc.*.tmp")))
            got: list[erllama.Completion] = []

            async def resume() -> None:
                prompt = [*t1, *r1.token_ids, 300]
                got.append(await other.complete(b, prompt, parent_key=r1.finish_key, max_tokens=2))

            async with anyio.create_task_group() as tg:
                tg.start_soon(resume)
                # The other engine found the row being written and waits for it: now the
                # saver may publish.
                await wait_for(lambda: bytes.fromhex(r1.finish_key) in seen_writing)
                may_publish.set()
            (r2,) = got
            assert r2.cache_hit_kind == "partial"
            assert r2.cache_delta.read == len(t1) + 3
            c = other.cache_counters()
            assert c.hits_resume == 1 and c.adopted == 1
    finally:
        may_publish.set()


async def test_a_corrupt_file_is_a_miss_counted_and_removed(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    cfg = cache_cfg(tmp_path, ram_bytes=0, ram_file_dir=None)
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        prompt = await engine.tokenize(mid, words(30))
        r = await engine.complete(mid, prompt, max_tokens=3)
    resent = [*prompt, *r.token_ids]
    path = tmp_path / "disk" / f"{r.finish_key}.kvc"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the payload: only the checksum can tell
    path.write_bytes(bytes(data))
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        warm = await engine.complete(mid, resent, max_tokens=4)
        assert warm.cache_hit_kind == "partial"  # the damaged row was skipped, the cold row used
        assert engine.cache_counters().corrupt_files == 1
        assert not path.exists()
        assert warm.token_ids == (await cold_run(registry, resent, max_tokens=4)).token_ids


async def test_a_failing_pack_loses_that_save_only(
    cached: erllama.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Packing reads the KV without changing it: the model's state is not in doubt.
    bad = await cached.load_model("bad", stub_config(fail_at="pack"))
    r = await cached.complete(bad, words(40), max_tokens=3)
    assert r.finish_reason == "length" and r.finish_key is None
    assert "injected failure at pack" in caplog.text
    assert cached.status(bad) == "idle"
    assert cached.cache_counters().saves_dropped == 2  # the cold save and the finish save
    again = await cached.complete(bad, words(40), max_tokens=3)
    assert again.token_ids == r.token_ids


async def test_a_symlinked_cache_directory_is_refused(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    cfg = cache_cfg(tmp_path, disk_dir=tmp_path / "link")
    with pytest.raises(erllama.CacheError):
        async with erllama.open_engine(cfg, backends=registry):
            pass


async def test_counters_account_time_and_tiers(cached: erllama.Engine) -> None:
    mid = await cached.load_model("m", stub_config())
    await cached.complete(mid, words(40), max_tokens=3)
    c = cached.cache_counters()
    assert c.pack_s > 0 and c.lookups == 1 and c.rows_ram == 2
    assert c.bytes_ram > 0 and c.saves == 2 and c.hits == 0


async def test_the_cache_switched_off_saves_nothing(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    r = await engine.complete(mid, words(40), max_tokens=3)
    assert r.finish_key is None and r.cache_hit_kind == "cold"
    assert engine.cache_counters() == erllama.CacheCounters()
