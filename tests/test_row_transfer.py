"""A cache row moves between engines as bytes, validated like a file (the scale-out path)."""

from __future__ import annotations

from pathlib import Path

import pytest

import erllama
from erllama.plugins import BackendRegistry

from .helpers import cold_run, stub_config, words

pytestmark = pytest.mark.anyio


def cache_at(root: Path, tier: str) -> erllama.EngineConfig:
    if tier == "ram":
        cache = erllama.CacheConfig(ram_file_dir=None)
    else:
        cache = erllama.CacheConfig(ram_bytes=0, ram_file_dir=None, disk_dir=root)
    return erllama.EngineConfig(cache=cache)


@pytest.mark.parametrize("tier", ["ram", "disk"])
async def test_an_exported_row_restores_in_another_engine_exactly(
    registry: BackendRegistry, tmp_path: Path, tier: str
) -> None:
    async with erllama.open_engine(cache_at(tmp_path / "a", tier), backends=registry) as a:
        mid = await a.load_model("m", stub_config())
        first = await a.complete(mid, words(40), max_tokens=4)
        assert first.finish_key is not None
        await a.wait_saved()
        data = await a.export_row(first.finish_key)
    assert data is not None
    async with erllama.open_engine(cache_at(tmp_path / "b", "ram"), backends=registry) as b:
        mid = await b.load_model("m", stub_config())
        assert await b.import_row(data) == first.finish_key
        resent = [*first.context_tokens, 300, 301]
        warm = await b.complete(mid, resent, max_tokens=5)
        assert warm.cache_hit_kind == "partial"
        assert warm.stats.cache_delta.read == len(first.context_tokens)
    assert warm.token_ids == (await cold_run(registry, resent, max_tokens=5)).token_ids


async def test_a_damaged_row_is_refused_and_counted(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    async with erllama.open_engine(cache_at(tmp_path, "ram"), backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        r = await engine.complete(mid, words(40), max_tokens=4)
        data = bytearray(await engine.export_row(r.finish_key or "") or b"")
        data[-2] ^= 0x40
        with pytest.raises(erllama.CacheError) as exc:
            await engine.import_row(bytes(data))
        assert exc.value.operation == "import"
        assert engine.cache_counters().corrupt_files == 1
        assert await engine.export_row("00" * 32) is None
