"""Configs from attrs, dicts and TOML; every bad key is reported with its path."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

import erllama
from erllama.config import structure_config


def test_defaults_are_sane() -> None:
    cfg = erllama.EngineConfig()
    assert cfg.cache.enabled and cfg.cache.ram_bytes > 0 and cfg.cache.disk_dir is None
    assert not cfg.pressure.enabled
    m = erllama.ModelConfig()
    assert m.backend == "llama_cpp" and m.n_seq_max == 1


def test_a_dict_builds_nested_configs() -> None:
    cfg = erllama.load_config(
        {
            "cache": {"disk_dir": "/tmp/x", "policy": {"min_tokens": 16}},
            "models": {"tiny": {"backend": "stub", "n_ctx": 256, "options": {"eog_every": 5}}},
        }
    )
    assert cfg.cache.disk_dir == Path("/tmp/x")
    assert cfg.cache.policy.min_tokens == 16
    assert cfg.models["tiny"].options == {"eog_every": 5}


def test_a_toml_file_builds_a_config(tmp_path: Path) -> None:
    path = tmp_path / "erllama.toml"
    path.write_text(
        """
[cache]
ram_bytes = 1048576

[pressure]
enabled = true
high_watermark = 0.9
low_watermark = 0.5

[models.tiny]
backend = "stub"
n_ctx = 128
""",
        encoding="utf-8",
    )
    cfg = erllama.load_config(path)
    assert cfg.cache.ram_bytes == 1 << 20
    assert cfg.pressure.high_watermark == 0.9
    assert cfg.models["tiny"].n_ctx == 128


@pytest.mark.parametrize(
    ("data", "paths"),
    [
        ({"cache": {"ram_bytez": 1}}, ["cache.ram_bytez"]),
        ({"cache": {"ram_bytes": -1}}, ["cache.ram_bytes"]),
        ({"models": {"a": {"n_ctx": "big"}}}, ["models.a.n_ctx"]),
        ({"models": {"a": {"n_ctx": 1.5}}}, ["models.a.n_ctx"]),
        ({"models": {"a": {"flash_attn": "yes"}}}, ["models.a.flash_attn"]),
        ({"models": {"a": {"type_k": "q9"}}}, ["models.a.type_k"]),
        ({"models": {"a": {"fingerprint": "abc"}}}, ["models.a.fingerprint"]),
        ({"pressure": {"high_watermark": 0.5, "low_watermark": 0.7}}, ["pressure.low_watermark"]),
        ({"pressure": {"evict_tiers": ["ram", "tape"]}}, ["pressure.evict_tiers"]),
        (
            {"cache": {"policy": {"cold_min_tokens": 9, "cold_max_tokens": 3}}},
            ["cache.policy.cold_max_tokens"],
        ),
        (
            {"models": {"a": {"n_ctx": "x", "n_batch": "y"}}},
            ["models.a.n_ctx", "models.a.n_batch"],
        ),
    ],
)
def test_bad_values_raise_config_error_naming_each_key_path(
    data: dict[str, object], paths: list[str]
) -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.load_config(data)
    assert sorted(exc.value.paths) == sorted(paths)
    for p in paths:
        assert p in str(exc.value)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.ModelConfig(n_ctx=0)
    assert exc.value.paths == ["n_ctx"]
    with pytest.raises(erllama.ConfigError):
        erllama.PressureConfig(source="custom")


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(erllama.ConfigError, match="cannot read"):
        erllama.load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache\n", encoding="utf-8")
    with pytest.raises(erllama.ConfigError, match="not valid TOML"):
        erllama.load_config(bad)


def test_custom_pressure_callable_may_be_named_by_import_path() -> None:
    cfg = structure_config({"source": "custom", "custom": "os:getpid"}, erllama.PressureConfig)
    import os

    assert cfg.custom is os.getpid


def test_every_bad_key_of_a_class_is_reported_with_nested_ones() -> None:
    # Three bad values of one class (a type error, two range errors) and an unknown key,
    # beside bad keys of nested classes: one ConfigError names all of them.
    data = {
        "cache": {
            "ram_bytes": -1,
            "writers": 0,
            "sweep_interval_s": "often",
            "ram_bytez": 1,
            "policy": {"min_tokens": 0},
        },
        "models": {"m": {"n_ctx": 0, "n_batch": "big", "type_k": "q9"}},
        "pressure": {"custom": "no_such_module_xyz:f", "interval_s": 0},
    }
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.load_config(data)
    assert sorted(exc.value.paths) == [
        "cache.policy.min_tokens",
        "cache.ram_bytes",
        "cache.ram_bytez",
        "cache.sweep_interval_s",
        "cache.writers",
        "models.m.n_batch",
        "models.m.n_ctx",
        "models.m.type_k",
        "pressure.custom",
        "pressure.interval_s",
    ]
    for path in exc.value.paths:
        assert path in str(exc.value)


def test_direct_construction_reports_every_bad_field() -> None:
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.ModelConfig(n_ctx=0, n_batch=0, type_k="q9", fingerprint="abc")
    assert exc.value.paths == ["n_ctx", "n_batch", "type_k", "fingerprint"]
    # A field that fails its type check is not also compared (no TypeError from "x" >= 1),
    # and a cross-field rule waits for its fields to be valid.
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.CachePolicy(cold_min_tokens="x", cold_max_tokens=1, min_tokens=0)  # type: ignore[arg-type]
    assert exc.value.paths == ["min_tokens", "cold_min_tokens"]
    with pytest.raises(erllama.ConfigError) as exc:
        erllama.PressureConfig(high_watermark=0.5, low_watermark=0.7, interval_s=0)
    assert sorted(exc.value.paths) == ["interval_s", "low_watermark"]


def test_nested_configs_given_as_mappings_are_converted_or_refused_at_construction() -> None:
    cfg = erllama.ModelConfig(
        thinking_markers={"start": "<think>", "end": "</think>"},  # type: ignore[arg-type]
        tool_call_markers={"start": "<tool_call>", "end": "</tool_call>"},  # type: ignore[arg-type]
        policy={"min_tokens": 8},  # type: ignore[arg-type]
    )
    assert cfg.thinking_markers == erllama.ThinkingMarkers(start="<think>", end="</think>")
    assert cfg.tool_call_markers == erllama.ToolCallMarkers(start="<tool_call>", end="</tool_call>")
    assert cfg.policy == erllama.CachePolicy(min_tokens=8)
    bad: list[tuple[dict[str, object], str]] = [
        ({"thinking_markers": {"start": "<think>"}}, "thinking_markers.end"),
        ({"tool_call_markers": {"start": "a", "end": "b", "extra": 1}}, "tool_call_markers.extra"),
        ({"thinking_markers": "<think>"}, "thinking_markers"),
        ({"policy": {"min_tokens": 0}}, "policy.min_tokens"),
    ]
    for fields, path in bad:
        with pytest.raises(erllama.ConfigError) as exc:
            erllama.ModelConfig(**fields)  # type: ignore[arg-type]
        assert exc.value.paths == [path]


@pytest.mark.anyio
async def test_markers_given_as_a_mapping_work_at_load(
    engine: erllama.Engine,
) -> None:
    from .helpers import stub_config

    cfg = attrs.evolve(
        stub_config(script="<think> kabo </think> rite"),
        thinking_markers={"start": "<think>", "end": "</think>"},
    )
    mid = await engine.load_model("m", cfg)
    assert engine.model_info(mid).thinking_markers == ("<think>", "</think>")
    done = await engine.complete(mid, "hi", max_tokens=40, thinking=True)
    assert done.thinking.strip() == "kabo" and done.text.strip() == "rite"
