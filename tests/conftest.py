"""Shared fixtures. Async tests run on both asyncio and trio via anyio's pytest plugin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import erllama
from erllama.backends import stub
from erllama.plugins import BackendRegistry

from .helpers import SmallDisk, unblock_stubs


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def registry() -> BackendRegistry:
    """A fresh registry holding only the stub: tests never autoload entry points."""
    return erllama.make_backend_registry({"stub": stub}, autoload=False)


@pytest.fixture
def no_cache() -> erllama.EngineConfig:
    return erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))


@pytest.fixture
def cache_config(tmp_path: Path) -> erllama.EngineConfig:
    """All three tiers on, in per-test directories (never the real /dev/shm default)."""
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(
            ram_file_dir=tmp_path / "shm",
            disk_dir=tmp_path / "disk",
        )
    )


@pytest.fixture
async def engine(
    registry: BackendRegistry, no_cache: erllama.EngineConfig
) -> AsyncIterator[erllama.Engine]:
    async with erllama.open_engine(no_cache, backends=registry) as eng:
        try:
            yield eng
        finally:
            unblock_stubs()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """A 1 MiB filesystem for a disk tier, made full by ``fill()``; see :class:`SmallDisk`."""
    with SmallDisk.mounted(tmp_path / "fs", monkeypatch) as disk:
        yield disk


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[object]:
    """One local Ray instance with Serve for the whole session (tests/ray/cluster.py);
    skipped without the ray extra."""
    pytest.importorskip("ray.serve", reason="needs the ray extra")
    from .ray.cluster import local_serve

    with local_serve() as instance:
        yield instance
