from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import erllama
from erllama.plugins import BackendRegistry


@pytest.fixture
async def cached_engine(registry: BackendRegistry, tmp_path: Path) -> AsyncIterator[erllama.Engine]:
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=tmp_path / "shm", disk_dir=tmp_path / "disk")
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        yield engine
