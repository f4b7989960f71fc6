"""Pressure configuration: validation, defaults, and the source name checked at open."""

from __future__ import annotations

import math
from typing import Any

import pytest

import erllama
from erllama.config import structure_config
from erllama.plugins import BackendRegistry
from erllama.pressure.registry import PressureSourceRegistry

pytestmark = pytest.mark.anyio


def test_defaults_are_off_and_match_the_documented_values() -> None:
    cfg = erllama.PressureConfig()
    assert not cfg.enabled and cfg.source == "psutil" and cfg.custom is None
    assert (cfg.high_watermark, cfg.low_watermark) == (0.85, 0.75)
    assert cfg.interval_s == 5.0 and cfg.sample_timeout_s == 10.0
    assert cfg.min_evict_bytes == 1024 * 1024
    assert cfg.evict_tiers == ("ram", "ram_file") and cfg.unload_idle_models


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"high_watermark": 0.5, "low_watermark": 0.5}, "pressure.low_watermark"),
        ({"high_watermark": 0.5, "low_watermark": 0.7}, "pressure.low_watermark"),
        ({"high_watermark": 1.1}, "pressure.high_watermark"),
        ({"low_watermark": -0.1}, "pressure.low_watermark"),
        ({"high_watermark": math.nan}, "pressure.high_watermark"),
        ({"high_watermark": True}, "pressure.high_watermark"),
        ({"interval_s": 0}, "pressure.interval_s"),
        ({"sample_timeout_s": -1}, "pressure.sample_timeout_s"),
        ({"min_evict_bytes": -1}, "pressure.min_evict_bytes"),
        ({"evict_tiers": ["ram", "tape"]}, "pressure.evict_tiers"),
        ({"source": ""}, "pressure.source"),
        ({"source": "custom"}, "pressure.custom"),
        ({"custom": "no_such_module_xyz:f"}, "pressure.custom"),
        ({"interval": 5}, "pressure.interval"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(erllama.ConfigError) as info:
        structure_config({"pressure": fields}, erllama.EngineConfig)
    assert path in info.value.paths


def test_watermarks_at_the_bounds_are_fine() -> None:
    cfg = erllama.PressureConfig(high_watermark=1.0, low_watermark=0.0)
    assert (cfg.low_watermark, cfg.high_watermark) == (0.0, 1.0)


async def test_an_unknown_source_is_refused_at_open(
    registry: BackendRegistry, sources: PressureSourceRegistry
) -> None:
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        pressure=erllama.PressureConfig(enabled=True, source="dowsing_rod"),
    )
    with pytest.raises(erllama.ConfigError) as info:
        async with erllama.open_engine(cfg, backends=registry, pressure_sources=sources):
            raise AssertionError("opened")
    assert info.value.paths == ["pressure.source"]
    assert "dowsing_rod" in str(info.value) and "nvidia_smi" in str(info.value)


async def test_a_disabled_scheduler_does_not_look_its_source_up(
    registry: BackendRegistry, sources: PressureSourceRegistry
) -> None:
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        pressure=erllama.PressureConfig(source="dowsing_rod"),
    )
    async with erllama.open_engine(cfg, backends=registry, pressure_sources=sources) as engine:
        assert engine.pressure_status().source == "dowsing_rod"
        assert (await engine.force_check()).outcome == "disabled"


def test_a_plugin_without_the_sample_hook_is_refused() -> None:
    class Nothing:
        pass

    with pytest.raises(erllama.ConfigError) as info:
        erllama.make_pressure_registry({"nothing": Nothing}, autoload=False)
    assert info.value.paths == ["pressure.source"]


def test_the_builtin_sources_are_entry_points() -> None:
    assert {"psutil", "nvidia_smi", "custom"} <= set(erllama.make_pressure_registry().names())


async def test_one_plugin_may_be_a_backend_and_a_pressure_source() -> None:
    from erllama.backends import hookimpl as backend_hookimpl
    from erllama.pressure import hookimpl

    class Both:
        @backend_hookimpl
        def load(self, config: erllama.ModelConfig) -> None:
            raise NotImplementedError

        @hookimpl
        def sample(self, config: erllama.PressureConfig) -> tuple[int, int]:
            return 1, 2

    # Each plugin manager sees only its own project's hooks: no "unknown hook" either way.
    erllama.make_pressure_registry({"both": Both}, autoload=False)
    with pytest.raises(erllama.ConfigError, match="lacks required hooks"):
        erllama.make_backend_registry({"both": Both}, autoload=False)
