"""A cache directory holding more than the engine's budget for it: the engine opens at once,
trims the tier to its budget (least valuable rows first, the order eviction uses) and serves.
The same for two engines sharing a directory with different budgets, and for the sweeper
adopting rows that push a tier over budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

import erllama
from erllama.plugins import BackendRegistry

from ..helpers import cold_run, stub_config, words

pytestmark = pytest.mark.anyio

#: One row per request (its finish row, 1 + 30 + 3 tokens: every row the same size), no cold
#: rows; only disk, so every row is a file and every hit reads (and counts on) its file.
POLICY = erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000, continued_interval=10_000)
N_ROWS = 6
#: Opening must not wait on the writers' 30 s drain timeout: well under it.
PROMPT_OPEN_S = 5.0


def disk_cfg(tmp_path: Path, **kw: Any) -> erllama.EngineConfig:
    fields: dict[str, Any] = {
        "ram_bytes": 0,
        "ram_file_dir": None,
        "disk_dir": tmp_path / "disk",
        "policy": POLICY,
        "sweep_interval_s": 3600.0,
    }
    fields.update(kw)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))


def prompt(i: int) -> str:
    return words(30, 100 * i)


def files(d: Path) -> dict[str, int]:
    return {p.name[:-4]: p.stat().st_size for p in d.glob("*.kvc")}


async def fill(registry: BackendRegistry, cfg: erllama.EngineConfig, n: int = N_ROWS) -> list[str]:
    """Save ``n`` finish rows, oldest first; returns their keys."""
    keys = []
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        for i in range(n):
            r = await engine.complete(mid, prompt(i), max_tokens=3)
            assert r.finish_key is not None
            keys.append(r.finish_key)
            await engine.wait_saved()  # distinct created times
    return keys


async def serves_like_a_cold_run(engine: erllama.Engine, registry: BackendRegistry) -> None:
    mid = await engine.load_model("m", stub_config())
    for i in (0, N_ROWS - 1, N_ROWS + 3):
        r = await engine.complete(mid, prompt(i), max_tokens=4)
        cold = await cold_run(registry, prompt(i), max_tokens=4)
        assert (r.text, r.token_ids) == (cold.text, cold.token_ids)


async def test_an_engine_opens_promptly_on_a_disk_tier_over_its_budget(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    keys = await fill(registry, disk_cfg(tmp_path))
    sizes = files(tmp_path / "disk")
    assert set(sizes) == set(keys)
    budget = sum(sizes.values()) // 2
    with anyio.fail_after(PROMPT_OPEN_S):
        async with erllama.open_engine(
            disk_cfg(tmp_path, disk_bytes=budget), backends=registry
        ) as e:
            await e.wait_saved()
            c = e.cache_counters()
            assert c.bytes_disk <= budget and c.evictions >= N_ROWS // 2
            assert sum(files(tmp_path / "disk").values()) == c.bytes_disk
            await serves_like_a_cold_run(e, registry)


async def test_a_ram_file_tier_over_its_budget_spills_its_excess_to_disk(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    shm = tmp_path / "shm"
    keys = await fill(registry, disk_cfg(tmp_path, ram_file_dir=shm, disk_dir=None))
    budget = sum(files(shm).values()) // 2
    cfg = disk_cfg(tmp_path, ram_file_dir=shm, ram_file_bytes=budget)
    with anyio.fail_after(PROMPT_OPEN_S):
        async with erllama.open_engine(cfg, backends=registry) as e:
            await e.wait_saved()
            c = e.cache_counters()
            assert c.bytes_ram_file <= budget and c.spills >= N_ROWS // 2 and c.evictions == 0
            # Nothing was lost: every row is on exactly one tier.
            on_shm, on_disk = files(shm), files(tmp_path / "disk")
            assert set(on_shm) | set(on_disk) == set(keys) and not set(on_shm) & set(on_disk)
            await serves_like_a_cold_run(e, registry)


async def test_a_ram_file_tier_over_its_budget_with_no_tier_below_evicts(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    shm = tmp_path / "shm"
    cfg = disk_cfg(tmp_path, ram_file_dir=shm, disk_dir=None)
    await fill(registry, cfg)
    budget = sum(files(shm).values()) // 3
    with anyio.fail_after(PROMPT_OPEN_S):
        async with erllama.open_engine(
            disk_cfg(tmp_path, ram_file_dir=shm, ram_file_bytes=budget, disk_dir=None),
            backends=registry,
        ) as e:
            await e.wait_saved()
            assert sum(files(shm).values()) == e.cache_counters().bytes_ram_file <= budget
            await serves_like_a_cold_run(e, registry)


async def test_trimming_drops_the_least_valuable_rows_first(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    keys = await fill(registry, disk_cfg(tmp_path))
    # Make the oldest row popular: each persisted hit is worth a second of recency, far more
    # than the milliseconds between the rows' creation times.
    no_saves = disk_cfg(tmp_path, policy=erllama.CachePolicy(save_finish=False))
    async with erllama.open_engine(no_saves, backends=registry) as e:
        mid = await e.load_model("m", stub_config(keep_live_kv=False))
        row = e.cache_row(keys[0])
        assert row is not None
        tokens = list(row.tokens)
        for _ in range(5):
            assert (await e.complete(mid, tokens, max_tokens=1)).cache_hit_kind == "exact"
    sizes = files(tmp_path / "disk")
    assert len(set(sizes.values())) == 1  # equal rows: the budget is a row count
    budget = 3 * sizes[keys[0]]
    with anyio.fail_after(PROMPT_OPEN_S):
        async with erllama.open_engine(
            disk_cfg(tmp_path, disk_bytes=budget), backends=registry
        ) as e:
            await e.wait_saved()
    assert set(files(tmp_path / "disk")) == {keys[0], keys[-2], keys[-1]}


async def test_two_engines_sharing_a_directory_with_different_budgets_both_serve(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    await fill(registry, disk_cfg(tmp_path))
    total = sum(files(tmp_path / "disk").values())
    small = total // 3
    with anyio.fail_after(2 * PROMPT_OPEN_S):
        async with (
            erllama.open_engine(disk_cfg(tmp_path), backends=registry) as big,
            erllama.open_engine(disk_cfg(tmp_path, disk_bytes=small), backends=registry) as little,
        ):
            await little.wait_saved()
            assert sum(files(tmp_path / "disk").values()) <= small
            # The larger engine indexed rows the smaller one has since deleted: they are
            # misses for it, never errors, and its sweep forgets them.
            await serves_like_a_cold_run(big, registry)
            await serves_like_a_cold_run(little, registry)
            # The smaller engine trims first (it may adopt and drop rows the larger one just
            # saved); the larger one's sweep then forgets whatever was deleted under it.
            for e in (little, big):
                await e.wait_saved()
                await e.sweep_cache()
                await e.wait_saved()
            on_disk = sum(files(tmp_path / "disk").values())
            assert little.cache_counters().bytes_disk == on_disk <= small
            assert big.cache_counters().bytes_disk == on_disk


async def test_the_sweeper_adopting_rows_over_budget_trims_the_tier(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    keys = await fill(registry, disk_cfg(tmp_path, disk_dir=tmp_path / "elsewhere"))
    sizes = files(tmp_path / "elsewhere")
    budget = 2 * max(sizes.values())
    async with erllama.open_engine(
        disk_cfg(tmp_path, disk_bytes=budget), backends=registry
    ) as little:
        # Another engine publishes beside it (link(2) into place, as a writer does).
        for key in keys:
            os.link(tmp_path / "elsewhere" / f"{key}.kvc", tmp_path / "disk" / f"{key}.kvc")
        await little.sweep_cache()
        await little.wait_saved()
        c = little.cache_counters()
        assert c.adopted == N_ROWS and c.evictions == N_ROWS - 2
        # Adopted in eviction order: the newest rows are the ones kept.
        assert set(files(tmp_path / "disk")) == set(keys[-2:])
        assert sum(files(tmp_path / "disk").values()) == c.bytes_disk <= budget
        await serves_like_a_cold_run(little, registry)
