"""Fixtures for the pressure scheduler: a source registry without entry points, a meter
that reports memory from the engine's own state, and an engine factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama.plugins import BackendRegistry
from erllama.pressure import custom, nvidia_smi, psutil_source
from erllama.pressure.registry import PressureSourceRegistry

from ..helpers import words

#: Cache policy that saves a finish row for every request and nothing else.
POLICY = erllama.CachePolicy(
    min_tokens=4, cold_min_tokens=10_000, cold_max_tokens=10_000, continued_interval=100_000
)


@pytest.fixture
def sources() -> PressureSourceRegistry:
    """The built-in sources, registered by hand: tests never autoload entry points."""
    return erllama.make_pressure_registry(
        {"psutil": psutil_source, "nvidia_smi": nvidia_smi, "custom": custom}, autoload=False
    )


@attrs.define
class Meter:
    """A custom pressure source: memory used is ``base`` plus the engine's cache bytes plus
    ``per_model`` for each loaded model, so freeing shows up in the next reading."""

    total: int = 100_000
    base: int = 0
    per_model: int = 0
    engine: erllama.Engine | None = None
    #: ``anyio.current_time()`` of every reading.
    calls: list[float] = attrs.Factory(list)

    def erllama_bytes(self) -> int:
        if self.engine is None:
            return 0
        c = self.engine.cache_counters()
        models = len(self.engine.list_models())
        return c.bytes_ram + c.bytes_ram_file + c.bytes_disk + self.per_model * models

    def aim(self, used: int) -> None:
        """Set ``base`` so that the next reading is ``used``."""
        self.base = used - self.erllama_bytes()

    def __call__(self) -> tuple[int, int]:
        self.calls.append(anyio.current_time())
        return min(self.base + self.erllama_bytes(), self.total), self.total


@pytest.fixture
def meter() -> Meter:
    return Meter()


async def fill(engine: erllama.Engine, model_id: str, rows: int, start: int = 0) -> None:
    """Make ``rows`` cache rows (one finish row per request, oldest first)."""
    for i in range(rows):
        await engine.complete(model_id, words(20, 1000 * (start + i)), max_tokens=2)


OpenEngine = Callable[..., AbstractAsyncContextManager[erllama.Engine]]


@pytest.fixture
def open_engine(
    registry: BackendRegistry, sources: PressureSourceRegistry, tmp_path: Path, meter: Meter
) -> OpenEngine:
    """``open_engine(pressure=..., **cache_fields)``: an engine on the stub with a RAM tier
    and a ram_file tier under tmp_path; the meter is attached to it."""

    @asynccontextmanager
    async def opener(
        pressure: erllama.PressureConfig | None = None, **cache: Any
    ) -> AsyncIterator[erllama.Engine]:
        fields: dict[str, Any] = {
            "ram_file_dir": tmp_path / "shm",
            "policy": POLICY,
            "sweep_interval_s": 3600.0,
        }
        fields.update(cache)
        config = erllama.EngineConfig(
            cache=erllama.CacheConfig(**fields),
            pressure=pressure or erllama.PressureConfig(),
        )
        async with erllama.open_engine(
            config, backends=registry, pressure_sources=sources
        ) as engine:
            meter.engine = engine
            yield engine

    return opener


def forced(meter: Meter, **kw: Any) -> erllama.PressureConfig:
    """Enabled, on the meter, with an interval long enough that only force_check runs."""
    fields: dict[str, Any] = {
        "enabled": True,
        "source": "custom",
        "custom": meter,
        "interval_s": 3600.0,
        "min_evict_bytes": 0,
    }
    fields.update(kw)
    return erllama.PressureConfig(**fields)
