"""Configuration: frozen attrs classes and the one cattrs converter that builds them.

Build configs directly (``ModelConfig(model_path=p, n_ctx=2048)``), from a dict
(``structure_config(d, EngineConfig)``) or from a TOML file (``load_config(path)``). Every
invalid value raises :class:`~erllama.errors.ConfigError` naming each bad key by its dotted path;
unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from .errors import ConfigError

__all__ = [
    "CacheConfig",
    "CachePolicy",
    "EngineConfig",
    "ModelConfig",
    "PressureConfig",
    "converter",
    "load_config",
    "structure_config",
]

T = TypeVar("T")
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

#: KV cache element types llama.cpp accepts for type_k / type_v.
KV_TYPES = frozenset({"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"})
CACHE_TIERS = ("ram", "ram_file", "disk")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError([(field, msg)])


def _at_least(n: float) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _check(value >= n, attr.name, f"must be >= {n}, got {value!r}")

    return check


def _is_int(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    # bool is an int subclass; a config that says n_ctx = true is a mistake worth naming.
    if value is not None:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            attr.name,
            f"must be an integer, got {value!r}",
        )


def _is_number(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    _check(
        isinstance(value, int | float) and not isinstance(value, bool),
        attr.name,
        f"must be a number, got {value!r}",
    )


def _int_field(default: int | None, minimum: int) -> Any:
    return attrs.field(default=default, validator=[_is_int, _at_least(minimum)])


def _opt_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _default_ram_file_dir() -> Path | None:
    shm = Path("/dev/shm")
    return shm / f"erllama-{os.getuid()}" if shm.is_dir() else None


@attrs.frozen(kw_only=True)
class CachePolicy:
    """When a model saves KV state, and how lookups probe for a prefix.

    Defaults suit chat on small models: a multi-turn conversation finds the previous turn's
    finish row from its second turn on.
    """

    #: No save of fewer tokens than this (every reason except evict/shutdown).
    min_tokens: int = _int_field(32, 1)
    #: A cold save happens only for prompts at least this long ...
    cold_min_tokens: int = _int_field(128, 1)
    #: ... and at most this long.
    cold_max_tokens: int = _int_field(30_000, 1)
    #: A continued save every this many tokens of context growth while generating.
    continued_interval: int = _int_field(512, 1)
    #: Tokens cut from the end of the prompt before aligning the cold save point: the tail of a
    #: prompt is what re-tokenises differently once the next turn appends text.
    boundary_trim_tokens: int = _int_field(32, 0)
    #: The cold save point is a multiple of this many tokens.
    boundary_align_tokens: int = _int_field(64, 1)
    #: How long a ``parent_key`` lookup waits for a row another process is still publishing.
    resume_wait_s: float = attrs.field(default=0.5, validator=[_is_number, _at_least(0)])
    #: Save at the end of every request (gives ``finish_key``).
    save_finish: bool = True

    def __attrs_post_init__(self) -> None:
        _check(
            self.cold_max_tokens >= self.cold_min_tokens,
            "cold_max_tokens",
            f"must be >= cold_min_tokens ({self.cold_min_tokens})",
        )


@attrs.frozen(kw_only=True)
class CacheConfig:
    """The three cache tiers and their byte budgets. A tier whose directory is None is off."""

    enabled: bool = True
    #: Budget of the in-process tier; 0 turns it off.
    ram_bytes: int = _int_field(1 * GIB, 0)
    #: Directory of the tmpfs tier (default ``/dev/shm/erllama-<uid>``).
    ram_file_dir: Path | None = attrs.field(factory=_default_ram_file_dir, converter=_opt_path)
    ram_file_bytes: int = _int_field(2 * GIB, 0)
    #: Directory of the persistent tier; off unless set.
    disk_dir: Path | None = attrs.field(default=None, converter=_opt_path)
    disk_bytes: int = _int_field(16 * GIB, 0)
    #: Concurrent writers (threads) publishing rows to file tiers.
    writers: int = _int_field(2, 1)
    #: Saves that may wait for a writer; one more is dropped and counted, never waited for.
    writer_queue: int = _int_field(8, 0)
    #: A reservation not published within this time is treated as abandoned by the sweeper.
    reservation_ttl_s: float = attrs.field(default=60.0, validator=[_is_number, _at_least(0.01)])
    sweep_interval_s: float = attrs.field(default=30.0, validator=[_is_number, _at_least(0.01)])
    policy: CachePolicy = attrs.field(factory=CachePolicy)


@attrs.frozen(kw_only=True)
class ModelConfig:
    """How to load and serve one model. Backend-specific extras go in ``options``."""

    #: Entry-point name of the backend plugin (``llama_cpp``, ``stub``, or a third party's).
    backend: str = "llama_cpp"
    model_path: Path | None = attrs.field(default=None, converter=_opt_path)
    n_ctx: int = _int_field(4096, 8)
    n_batch: int = _int_field(512, 1)
    n_ubatch: int | None = _int_field(None, 1)
    #: Sequences served at once (1 = one request at a time, the rest queue).
    n_seq_max: int = _int_field(1, 1)
    n_threads: int | None = _int_field(None, 1)
    n_threads_batch: int | None = _int_field(None, 1)
    #: Layers offloaded to the GPU; -1 means all.
    n_gpu_layers: int = _int_field(0, -1)
    type_k: str = attrs.field(default="f16")
    type_v: str = attrs.field(default="f16")
    #: None lets llama.cpp decide.
    flash_attn: bool | None = None
    #: Default sampler seed when a request gives none.
    seed: int = _int_field(0, 0)
    use_mmap: bool = True
    #: Allow ``embed`` (it uses its own small context, created on first use).
    embeddings: bool = True
    #: Keep a finished request's KV in its sequence and reuse its longest common prefix with
    #: the next prompt admitted there: no restore at all. Off only to measure cold paths.
    keep_live_kv: bool = True
    #: Requests that may wait behind the running ones; one more raises QueueFull.
    max_queue: int = _int_field(64, 0)
    #: Longest prompt slice prefilled per tick (default n_batch); cancel acts between slices.
    prefill_chunk: int | None = _int_field(None, 1)
    #: Cache identity override (hex SHA-256); default: SHA-256 of the GGUF file.
    fingerprint: str | None = attrs.field(default=None)
    #: Quantisation label override for the cache key; default: read from the model.
    quant: str | None = None
    #: Per-model override of the engine's cache policy.
    policy: CachePolicy | None = None
    #: Backend-specific settings passed through untouched.
    options: Mapping[str, Any] = attrs.field(factory=dict)

    @type_k.validator
    @type_v.validator
    def _kv_type(self, attr: attrs.Attribute[str], value: str) -> None:
        _check(value in KV_TYPES, attr.name, f"must be one of {sorted(KV_TYPES)}, got {value!r}")

    @fingerprint.validator
    def _fp(self, attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is None:
            return
        ok = isinstance(value, str) and len(value) == 64
        try:
            bytes.fromhex(value) if ok else None
        except ValueError:
            ok = False
        _check(ok, attr.name, "must be 64 hex digits (a SHA-256)")

    @property
    def effective_prefill_chunk(self) -> int:
        return min(self.prefill_chunk or self.n_batch, self.n_batch)


def _resolve_callable(value: Any) -> Any:
    """Accept a callable, or a ``"module:attribute"`` string naming one (so TOML can give it)."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and ":" in value:
        mod, _, name = value.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError([("custom", f"cannot import {value!r}: {exc}")]) from exc
        if callable(obj):
            return obj
    raise ConfigError([("custom", f"must be a callable or 'module:function', got {value!r}")])


@attrs.frozen(kw_only=True)
class PressureConfig:
    """The memory-pressure scheduler (off by default; see docs/pressure.md).

    Every ``interval_s`` it samples ``source``; at or above ``high_watermark`` (used/total of
    the fullest device) it frees down to ``low_watermark``: cache rows from ``evict_tiers``
    in order, then idle models, least recently used first. Whether ``source`` names a
    registered source is checked when an engine opens with the scheduler enabled.
    """

    enabled: bool = False
    #: Registered pressure source name: ``psutil``, ``nvidia_smi``, ``custom`` or a plugin's.
    source: str = "psutil"
    #: For ``source="custom"``: a sync or async callable returning ``(used_bytes, total_bytes)``.
    custom: Callable[[], Any] | None = attrs.field(default=None, converter=_resolve_callable)
    interval_s: float = attrs.field(default=5.0, validator=[_is_number, _at_least(0.001)])
    #: A reading that takes longer than this is unavailable (a hung ``nvidia-smi`` is killed).
    sample_timeout_s: float = attrs.field(default=10.0, validator=[_is_number, _at_least(0.001)])
    high_watermark: float = attrs.field(default=0.85, validator=_is_number)
    low_watermark: float = attrs.field(default=0.75, validator=_is_number)
    #: Each round frees at least this much when above the high watermark.
    min_evict_bytes: int = _int_field(1 * MIB, 0)
    #: Cache tiers the poller may evict from, in this order.
    evict_tiers: tuple[str, ...] = attrs.field(default=("ram", "ram_file"), converter=tuple)
    #: After the cache, unload idle models (least recently used first, evict-saved first).
    unload_idle_models: bool = True

    def __attrs_post_init__(self) -> None:
        _check(
            0 <= self.low_watermark < self.high_watermark <= 1,
            "low_watermark",
            "watermarks must satisfy 0 <= low_watermark < high_watermark <= 1, got "
            f"low={self.low_watermark}, high={self.high_watermark}",
        )
        for tier in self.evict_tiers:
            _check(tier in CACHE_TIERS, "evict_tiers", f"unknown tier {tier!r}")
        _check(
            isinstance(self.source, str) and bool(self.source),
            "source",
            f"must be a registered pressure source name, got {self.source!r}",
        )
        _check(
            self.source != "custom" or self.custom is not None,
            "custom",
            "source='custom' needs a callable in 'custom'",
        )


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Everything ``open_engine`` needs. ``models`` are loaded when the engine opens."""

    cache: CacheConfig = attrs.field(factory=CacheConfig)
    pressure: PressureConfig = attrs.field(factory=PressureConfig)
    models: Mapping[str, ModelConfig] = attrs.field(factory=dict)


def _strict(kind: type, *, allow: tuple[type, ...] = ()) -> Callable[[Any, Any], Any]:
    # cattrs would coerce 1.5 -> 1 and "yes" -> True; a config that says so is a mistake.
    accepted = (kind, *allow)

    def hook(value: Any, _t: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        if not isinstance(value, accepted):
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        return value

    return hook


converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(int, _strict(int))
converter.register_structure_hook(float, _strict(float, allow=(int,)))
converter.register_structure_hook(bool, _strict(bool))
converter.register_structure_hook(str, _strict(str))
converter.register_structure_hook(Path, lambda v, _t: Path(v))
converter.register_structure_hook(Path | None, lambda v, _t: None if v is None else Path(v))
converter.register_structure_hook(Callable[[], Any] | None, lambda v, _t: v)
converter.register_unstructure_hook(Path, str)


def _join(path: str, sub: str | int) -> str:
    if isinstance(sub, int):
        return f"{path}[{sub}]"
    return f"{path}.{sub}" if path else sub


def _problems(exc: BaseException, path: str) -> list[tuple[str, str]]:
    """Flatten a cattrs exception tree into (dotted path, message) pairs."""
    if isinstance(exc, ConfigError):
        return [(_join(path, p) if p else path, m) for p, m in exc.problems]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [(_join(path, k), "unknown key") for k in sorted(exc.extra_fields)]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out: list[tuple[str, str]] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            key = note.index if isinstance(note, IterableValidationNote) else note.name
            out.extend(_problems(sub, _join(path, key)))
        for sub in without:
            out.extend(_problems(sub, path))
        return out
    if isinstance(exc, KeyError):
        return [(_join(path, str(exc.args[0])), "required key missing")]
    if isinstance(exc, ValueError | TypeError):
        return [(path, str(exc))]
    return [(path, f"{type(exc).__name__}: {exc}")]


def structure_config(data: Mapping[str, Any], cls: type[T]) -> T:
    """Build ``cls`` from plain data, raising ConfigError that names every bad key path."""
    if not isinstance(data, Mapping):
        raise ConfigError([("", f"expected a table/mapping, got {type(data).__name__}")])
    try:
        return converter.structure(dict(data), cls)
    except ConfigError:
        raise
    except (BaseValidationError, ValueError, TypeError) as exc:
        raise ConfigError(_problems(exc, "")) from exc


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> EngineConfig:
    """Read an :class:`EngineConfig` from a TOML file path or a mapping."""
    if isinstance(source, Mapping):
        return structure_config(source, EngineConfig)
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"{path} is not valid TOML: {exc}")]) from exc
    return structure_config(data, EngineConfig)
