"""Configuration: frozen attrs classes and the one cattrs converter that builds them.

Build configs directly (``ModelConfig(model_path=p, n_ctx=2048)``), from a dict
(``structure_config(d, EngineConfig)``) or from a TOML file (``load_config(path)``). Every
invalid value raises :class:`~erllama.errors.ConfigError` naming each bad key by its dotted path;
unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import importlib
import math
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
    "SpeculativeConfig",
    "ThinkingMarkers",
    "ToolCallMarkers",
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


#: A field's checks live in its metadata under this key: functions of the value returning a
#: problem message or None. They are not attrs validators because attrs stops at the first
#: validator that raises, and a config should name every bad key at once.
_CHECKS = "erllama_checks"
_Check = Callable[[Any], "str | None"]


def _checked(*checks: _Check, **kw: Any) -> Any:
    return attrs.field(metadata={_CHECKS: checks}, **kw)


def _at_least(n: float) -> _Check:
    def check(value: Any) -> str | None:
        return None if value is None or value >= n else f"must be >= {n}, got {value!r}"

    return check


def _at_most(n: float) -> _Check:
    def check(value: Any) -> str | None:
        return None if value is None or value <= n else f"must be <= {n}, got {value!r}"

    return check


#: Longest draft: a verify pass is the draft plus the sampled token, and llama.cpp's CPU
#: flash attention switches to a tiled kernel (other arithmetic) at 64 tokens of a sequence.
MAX_DRAFT = 62


def _is_number_or_none(value: Any) -> str | None:
    return None if value is None else _is_number(value)


def _is_int(value: Any) -> str | None:
    # bool is an int subclass; a config that says n_ctx = true is a mistake worth naming.
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return f"must be an integer, got {value!r}"


def _is_number(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None
    return f"must be a number, got {value!r}"


def _kv_type(value: Any) -> str | None:
    return None if value in KV_TYPES else f"must be one of {sorted(KV_TYPES)}, got {value!r}"


def _sha256_hex(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 64:
        try:
            bytes.fromhex(value)
            return None
        except ValueError:
            pass
    return "must be 64 hex digits (a SHA-256)"


def _int_field(default: int | None, minimum: int) -> Any:
    # _is_int first: once a check fails the field's later checks are skipped, so ">= n" never
    # compares a string.
    return _checked(_is_int, _at_least(minimum), default=default)


def _number_field(default: float, minimum: float | None = None) -> Any:
    checks = (_is_number,) if minimum is None else (_is_number, _at_least(minimum))
    return _checked(*checks, default=default)


def _field_problems(cls: type, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Run the checks of every field of ``cls`` present in ``values``; one problem per field."""
    problems = []
    for field in attrs.fields(cls):
        if field.name not in values:
            continue
        for check in field.metadata.get(_CHECKS, ()):
            message = check(values[field.name])
            if message is not None:
                problems.append((field.name, message))
                break
    return problems


class _Problems:
    """Every problem of one config object, gathered before anything is raised."""

    def __init__(self, inst: Any) -> None:
        cls = type(inst)
        self.items = _field_problems(
            cls, {f.name: getattr(inst, f.name) for f in attrs.fields(cls)}
        )

    def valid(self, *names: str) -> bool:
        """Whether these fields passed their own checks (a cross-field rule needs that)."""
        return not any(path in names for path, _ in self.items)

    def check(self, cond: bool, field: str, msg: str) -> None:
        if not cond:
            self.items.append((field, msg))

    def raise_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _opt_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _forever_if_negative(value: Any) -> Any:
    """``keep_alive_s``: a negative or infinite number of seconds means kept for good
    (None), as Ollama's negative ``keep_alive`` does; anything else is checked as is."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and (value < 0 or value == math.inf) else value


def _seconds_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return None
    return f"must be a number of seconds (negative: kept loaded for good), got {value!r}"


def _opt_names(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _model_ids(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, tuple) and all(isinstance(v, str) and v for v in value):
        return None
    return f"must be a list of model ids, got {value!r}"


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
    #: No longer used: continued saves held generated tokens, whose cells a cache hit may
    #: not reuse (docs/caching.md#exactness). Accepted so that existing configs load.
    continued_interval: int = _int_field(512, 1)
    #: Tokens cut from the end of the prompt before aligning the cold save point: the tail of a
    #: prompt is what re-tokenises differently once the next turn appends text.
    boundary_trim_tokens: int = _int_field(32, 0)
    #: The cold save point is a multiple of this many tokens.
    boundary_align_tokens: int = _int_field(64, 1)
    #: How long a ``parent_key`` lookup waits for a row another process is still publishing.
    resume_wait_s: float = _number_field(0.5, 0)
    #: Save at the end of every request (gives ``finish_key``).
    save_finish: bool = True

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        if problems.valid("cold_min_tokens", "cold_max_tokens"):
            problems.check(
                self.cold_max_tokens >= self.cold_min_tokens,
                "cold_max_tokens",
                f"must be >= cold_min_tokens ({self.cold_min_tokens})",
            )
        problems.raise_any()


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
    reservation_ttl_s: float = _number_field(60.0, 0.01)
    sweep_interval_s: float = _number_field(30.0, 0.01)
    policy: CachePolicy = attrs.field(factory=CachePolicy)
    #: Records kept beside the rows in each file tier, per kind (replies for exact replay,
    #: tool-call ids): the least recently written go first past this. 0 keeps none.
    records: int = _int_field(4096, 0)

    @property
    def record_dirs(self) -> list[Path]:
        """The file tiers' directories, where records live (none with the cache off)."""
        if not self.enabled:
            return []
        tiers = ((self.ram_file_dir, self.ram_file_bytes), (self.disk_dir, self.disk_bytes))
        return [d for d, budget in tiers if d is not None and budget > 0]

    def __attrs_post_init__(self) -> None:
        _Problems(self).raise_any()


def _marker(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    return f"must be a non-empty string, got {value!r}"


def _opt_marker(value: Any) -> str | None:
    return None if value is None else _marker(value)


def _nested(cls: type[Any], name: str) -> Any:
    """A field holding a nested config: an instance of ``cls``, None, or a mapping of its
    fields (converted here, as the TOML path does; a bad one is a ConfigError naming
    ``name.key``). Anything else is reported by the field's check."""

    def convert(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        try:
            return structure_config(value, cls)
        except ConfigError as exc:
            raise ConfigError(
                [(f"{name}.{path}" if path else name, msg) for path, msg in exc.problems]
            ) from exc

    def check(value: Any) -> str | None:
        if value is None or isinstance(value, cls):
            return None
        return f"must be a {cls.__name__} or a mapping of its fields, got {value!r}"

    return attrs.field(default=None, converter=convert, metadata={_CHECKS: (check,)})


@attrs.frozen(kw_only=True)
class ThinkingMarkers:
    """The text that opens and closes a model's thinking span (``<think>``, ``</think>``)."""

    start: str = _checked(_marker)
    end: str = _checked(_marker)

    def __attrs_post_init__(self) -> None:
        _Problems(self).raise_any()


@attrs.frozen(kw_only=True)
class ToolCallMarkers:
    """The text around a model's tool calls (``<tool_call>``, ``</tool_call>``), and
    optionally around the free-form payload inside one (sampled with the request's own
    sampler; the rest of the call is sampled greedily)."""

    start: str = _checked(_marker)
    end: str = _checked(_marker)
    payload_start: str | None = _checked(_opt_marker, default=None)
    payload_end: str | None = _checked(_opt_marker, default=None)

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        problems.check(
            (self.payload_start is None) == (self.payload_end is None),
            "payload_start",
            "payload_start and payload_end go together",
        )
        problems.raise_any()


#: The tool-call markers of a model whose config and chat template name none: Hermes'
#: pair, which the tool instructions for a template without tool support name, and which a
#: forced call's grammar writes (see docs/tool-calls.md).
DEFAULT_TOOL_CALL_MARKERS = ToolCallMarkers(start="<tool_call>", end="</tool_call>")


@attrs.frozen(kw_only=True)
class SpeculativeConfig:
    """Speculative decoding of a model's greedy requests (docs/speculative.md).

    A drafter proposes the tokens likely to come next; one forward pass checks them all, and
    the model keeps the longest prefix it would have chosen itself, so the answer is the
    plain decode's, token for token. The built-in ``ngram`` drafter looks the last tokens up
    in the prompt and the reply so far (edits, copies and code rewrites repeat their input);
    third parties add drafters in the entry-point group ``erllama.drafters``.
    """

    #: Entry-point name of the drafter plugin.
    drafter: str = "ngram"
    #: Most tokens drafted per step. The engine adapts the length to the acceptance: it
    #: shrinks to nothing while drafts keep failing, so a request with nothing to draft is
    #: not slower.
    draft_max: int = _checked(_is_int, _at_least(1), _at_most(MAX_DRAFT), default=16)
    #: What one more draft token adds to a decode step, as a share of a one-token step
    #: (the draft length is chosen from it and the acceptance); None: learnt from the
    #: model's own steps (about 0.3 for SmolLM2 on a 2-core CPU, a few hundredths where
    #: passes are bound by reading weights).
    token_cost: float | None = _checked(_is_number_or_none, _at_least(0.0), default=None)
    #: ``ngram``: the longest and shortest run of recent tokens looked up (longest first).
    ngram_max: int = _int_field(4, 1)
    ngram_min: int = _int_field(2, 1)
    #: Drafter-specific settings passed through untouched.
    options: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        if problems.valid("ngram_max", "ngram_min"):
            problems.check(
                self.ngram_min <= self.ngram_max,
                "ngram_min",
                f"must be <= ngram_max ({self.ngram_max}), got {self.ngram_min}",
            )
        problems.raise_any()


@attrs.frozen(kw_only=True)
class ModelConfig:
    """How to load and serve one model. Backend-specific extras go in ``options``."""

    #: Entry-point name of the backend plugin (``llama_cpp``, ``stub``, or a third party's).
    backend: str = "llama_cpp"
    model_path: Path | None = attrs.field(default=None, converter=_opt_path)
    #: Context cells of each sequence: the longest prompt plus reply one request can have.
    #: A model serving ``n_seq_max`` sequences holds ``n_ctx * n_seq_max`` cells.
    n_ctx: int = _int_field(4096, 8)
    #: Most tokens one step decodes (every running sequence's next token plus prefill
    #: slices); at least ``n_seq_max``.
    n_batch: int = _int_field(512, 1)
    n_ubatch: int | None = _int_field(None, 1)
    #: Sequences served at once, batched into one step (1 = one request at a time, the rest
    #: queue).
    n_seq_max: int = _int_field(1, 1)
    #: Threads that decode (default: half the usable cores) and that prefill (default:
    #: ``n_threads`` when given, else all usable cores); see docs/loading.md#threads.
    n_threads: int | None = _int_field(None, 1)
    n_threads_batch: int | None = _int_field(None, 1)
    #: Layers offloaded to the GPU; -1 means all.
    n_gpu_layers: int = _int_field(0, -1)
    type_k: str = _checked(_kv_type, default="f16")
    type_v: str = _checked(_kv_type, default="f16")
    #: None lets llama.cpp decide.
    flash_attn: bool | None = None
    #: Sampler seed of requests that give none; None draws a fresh one per request (every
    #: request reports its seed in ``Stats.seed``, so a run can be replayed).
    seed: int | None = _int_field(None, 0)
    use_mmap: bool = True
    #: Allow ``embed`` (it uses its own small context, created on first use).
    embeddings: bool = True
    #: Keep a finished request's KV in its sequence and reuse its longest common prefix with
    #: the next prompt admitted there: no restore at all. Off only to measure cold paths.
    keep_live_kv: bool = True
    #: Requests that run at the same time and share a prompt prefix prefill it once: a
    #: request admitted while another (same fingerprint) is still to feed the prefix they
    #: share waits for it and copies those cells from its sequence, then feeds only its own
    #: rest (docs/caching.md "In-flight sharing"). Off only to measure cold paths.
    share_prefill: bool = True
    #: While the model is idle, feed a finished request's reply again on the prefill grid,
    #: one cell per call, so the next turn of the conversation restores it instead of
    #: prefilling it (docs/caching.md "Feeding replies again"). Off by default for now: it
    #: moves work into idle time, so what a request finds live then depends on how long the
    #: model was idle before it.
    refeed_replies: bool = False
    #: Requests that may wait behind the running ones; one more raises QueueFull.
    max_queue: int = _int_field(64, 0)
    #: The prefill grid G: prompts are fed in chunks ``[jG, (j+1)G)`` of absolute positions
    #: (one step each), and the KV cache reuses prefixes in whole cells of G tokens, which
    #: keeps a cache hit's answer bit for bit the cold run's (docs/caching.md#exactness).
    #: Default: 64 on the CPU (llama.cpp's CPU kernels gain nothing from larger chunks:
    #: measured 1.009x the time of 128-token chunks, within noise, and an exact hit re-feeds
    #: at most G tokens), ``max(64, n_batch // 4)`` with layers on a GPU. A short request
    #: arriving while a long prompt prefills gets its first token after one chunk;
    #: cancellation also acts between chunks.
    prefill_chunk: int | None = _int_field(None, 1)
    #: Cache identity override (hex SHA-256); default: SHA-256 of the GGUF file.
    fingerprint: str | None = _checked(_sha256_hex, default=None)
    #: Quantisation label override for the cache key; default: read from the model.
    quant: str | None = None
    #: Per-model override of the engine's cache policy.
    policy: CachePolicy | None = _nested(CachePolicy, "policy")  # noqa: RUF009 (attrs field)
    #: The model's thinking span markers. None: read from its chat template when it names a
    #: known pair (``<think>``/``</think>``), unless ``detect_markers`` is off.
    thinking_markers: ThinkingMarkers | None = _nested(ThinkingMarkers, "thinking_markers")  # noqa: RUF009
    #: The model's tool-call markers. None: read from its chat template when it names a
    #: known pair (``<tool_call>``/``</tool_call>``), else Hermes' pair
    #: (:data:`DEFAULT_TOOL_CALL_MARKERS`, what a template without tool support is told to
    #: write); ``detect_markers`` off: none.
    tool_call_markers: ToolCallMarkers | None = _nested(ToolCallMarkers, "tool_call_markers")  # noqa: RUF009
    detect_markers: bool = True
    #: A session's sequence idle this long is released (after an evict save), so a
    #: forgotten session never holds a sequence for good.
    session_ttl_s: float = _number_field(600.0, 0.001)
    #: How long the model stays loaded once idle, in seconds from its last use (Ollama's
    #: ``keep_alive``): None (or a negative number) keeps it loaded for good, 0 unloads it
    #: as soon as nothing uses it. A use may override it (``Engine.hold``).
    keep_alive_s: float | None = attrs.field(
        default=None, converter=_forever_if_negative, metadata={_CHECKS: (_seconds_or_none,)}
    )
    #: Speculative decoding of greedy requests; None: off. With the llama.cpp backend a
    #: verified draft equals plain decoding bit for bit only with flash attention on and
    #: one decode thread (llama.cpp's CPU kernels otherwise compute a multi-token pass
    #: with other arithmetic than a one-token pass), so those are its defaults then and
    #: other values are refused (docs/speculative.md "Exactness").
    speculative: SpeculativeConfig | None = _nested(SpeculativeConfig, "speculative")  # noqa: RUF009
    #: Backend-specific settings passed through untouched.
    options: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        if self.speculative is not None:
            # Measured (research/speculative/verify_invariance.py): only then does a
            # multi-token verify pass compute each token bit for bit as a one-token pass.
            problems.check(
                self.flash_attn is not False,
                "flash_attn",
                "must be on (true or unset) with speculative decoding: without flash "
                "attention llama.cpp computes a multi-token pass with other arithmetic than "
                "a one-token pass, and a verified draft must equal a plain decode",
            )
            problems.check(
                self.n_threads in (None, 1) or self.type_k == self.type_v == "q8_0",
                "n_threads",
                "must be 1 (or unset) with speculative decoding and an f16 KV cache: "
                "llama.cpp splits a one-token pass across decode threads past 256 cells, "
                "which a multi-token verify pass does not (prefill still uses "
                "n_threads_batch; with type_k and type_v q8_0 any count is exact)",
            )
        problems.check(
            self.flash_attn is not False or self.type_v in ("f32", "f16", "bf16"),
            "flash_attn",
            f"must be on (true or unset) with a quantized V cache (type_v={self.type_v!r}): "
            "llama.cpp computes attention over quantized V only with flash attention",
        )
        if problems.valid("n_batch", "n_seq_max"):
            # Every running sequence decodes one token per step, in one batch.
            problems.check(
                self.n_batch >= self.n_seq_max,
                "n_batch",
                f"must be >= n_seq_max ({self.n_seq_max}), got {self.n_batch}",
            )
        problems.raise_any()

    @property
    def effective_prefill_chunk(self) -> int:
        """G, the prefill grid (see ``prefill_chunk``)."""
        default = 64 if self.n_gpu_layers == 0 else max(64, self.n_batch // 4)
        return min(self.prefill_chunk or default, self.n_batch)


@attrs.frozen
class _Unresolved:
    """What ``custom`` holds when its value names no callable; its check reports ``reason``.

    The converter cannot raise: a converter runs before any check, so raising there would
    hide every other bad key of the config."""

    value: Any
    reason: str


def _resolve_callable(value: Any) -> Any:
    """Accept a callable, or a ``"module:attribute"`` string naming one (so TOML can give it)."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and ":" in value:
        mod, _, name = value.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as exc:
            return _Unresolved(value, f"cannot import {value!r}: {exc}")
        if callable(obj):
            return obj
    return _Unresolved(value, f"must be a callable or 'module:function', got {value!r}")


def _resolved(value: Any) -> str | None:
    return value.reason if isinstance(value, _Unresolved) else None


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
    custom: Callable[[], Any] | None = attrs.field(
        default=None, converter=_resolve_callable, metadata={_CHECKS: (_resolved,)}
    )
    interval_s: float = _number_field(5.0, 0.001)
    #: A reading that takes longer than this is unavailable (a hung ``nvidia-smi`` is killed).
    sample_timeout_s: float = _number_field(10.0, 0.001)
    high_watermark: float = _number_field(0.85)
    low_watermark: float = _number_field(0.75)
    #: Each round frees at least this much when above the high watermark.
    min_evict_bytes: int = _int_field(1 * MIB, 0)
    #: Cache tiers the poller may evict from, in this order.
    evict_tiers: tuple[str, ...] = attrs.field(default=("ram", "ram_file"), converter=tuple)
    #: After the cache, unload idle models (least recently used first, evict-saved first).
    unload_idle_models: bool = True

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        if problems.valid("low_watermark", "high_watermark"):
            low, high = self.low_watermark, self.high_watermark
            # Each bound names its own key; only their order names both.
            problems.check(0 < high <= 1, "high_watermark", f"must be in (0, 1], got {high}")
            problems.check(0 <= low < 1, "low_watermark", f"must be in [0, 1), got {low}")
            if 0 < high <= 1 and 0 <= low < 1:
                problems.check(
                    low < high,
                    "low_watermark",
                    f"must be below high_watermark ({high}), got {low}",
                )
        unknown = [t for t in self.evict_tiers if t not in CACHE_TIERS]
        problems.check(not unknown, "evict_tiers", f"unknown tier {', '.join(map(repr, unknown))}")
        problems.check(
            isinstance(self.source, str) and bool(self.source),
            "source",
            f"must be a registered pressure source name, got {self.source!r}",
        )
        if problems.valid("source", "custom"):
            problems.check(
                self.source != "custom" or self.custom is not None,
                "custom",
                "source='custom' needs a callable in 'custom'",
            )
        problems.raise_any()


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Everything ``open_engine`` needs. ``models`` are the models the engine knows: those
    ``preload`` names load when the engine opens (all of them by default), the others on
    their first use (see docs/loading.md#model-lifecycle)."""

    cache: CacheConfig = attrs.field(factory=CacheConfig)
    pressure: PressureConfig = attrs.field(factory=PressureConfig)
    models: Mapping[str, ModelConfig] = attrs.field(factory=dict)
    #: Key for the HMAC-SHA256 signatures of thinking spans (``ThinkingEnd.signature``);
    #: None: spans are not signed.
    thinking_signing_key: str | None = None
    #: Ids of ``models`` loaded when the engine opens; None: every one of them. The others
    #: load on their first use.
    preload: tuple[str, ...] | None = attrs.field(
        default=None, converter=_opt_names, metadata={_CHECKS: (_model_ids,)}
    )
    #: Models loaded at once at most; loading one more first unloads the least recently
    #: used idle model (evict-saved, so its cache rows stay), or waits for one to become
    #: idle. None: no limit.
    max_loaded_models: int | None = _int_field(None, 1)

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        if problems.valid("preload"):
            preload = self.preload if self.preload is not None else tuple(self.models)
            unknown = [m for m in preload if m not in self.models]
            problems.check(
                not unknown,
                "preload",
                f"names models the config does not define: {', '.join(map(repr, unknown))}",
            )
            limit = self.max_loaded_models
            if problems.valid("max_loaded_models") and limit is not None:
                what = "preload names" if self.preload is not None else "models (all preloaded)"
                problems.check(
                    len(set(preload)) <= limit,
                    "preload",
                    f"{what} {len(set(preload))} models, more than max_loaded_models "
                    f"({limit}): list in preload those to load at start (an empty list "
                    "loads none)",
                )
        problems.raise_any()


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


def _structure_fields(data: Any, cls: type[Any]) -> Any:
    """Build one config class from a mapping, reporting every bad key of it at once.

    cattrs' generated hook gives up before construction when any field fails to structure, so
    the checks of the fields that did structure would never run; this one structures field by
    field, checks what structured, and raises all of it together. Nested config classes come
    back through this hook, so their problems arrive with their own paths."""
    if not isinstance(data, Mapping):
        raise ConfigError([("", f"expected a table/mapping, got {type(data).__name__}")])
    fields = {f.alias: f for f in attrs.fields(cls)}
    problems = [(str(k), "unknown key") for k in data if k not in fields]
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key not in data:
            if field.default is attrs.NOTHING:
                problems.append((key, "required key missing"))
            continue
        try:
            values[key] = converter.structure(data[key], field.type)
        except (BaseValidationError, ValueError, TypeError) as exc:
            problems.extend(_problems(exc, key))
    if problems:
        structured = {
            fields[k].name: fields[k].converter(v) if callable(fields[k].converter) else v
            for k, v in values.items()
        }
        problems += _field_problems(cls, structured)
        raise ConfigError(problems)
    return cls(**values)


for _cls in (
    CachePolicy,
    CacheConfig,
    ThinkingMarkers,
    ToolCallMarkers,
    ModelConfig,
    PressureConfig,
    EngineConfig,
):
    attrs.resolve_types(_cls)
    converter.register_structure_hook(_cls, _structure_fields)


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
    return load_config_as(source, EngineConfig)


def load_config_as(source: str | os.PathLike[str] | Mapping[str, Any], cls: type[T]) -> T:
    """Build ``cls`` from a TOML file path or a mapping; a file that cannot be read, is not
    UTF-8 or is not TOML is a ConfigError, as is every bad key path."""
    if isinstance(source, Mapping):
        return structure_config(source, cls)
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"{path} is not UTF-8 text: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"{path} is not valid TOML: {exc}")]) from exc
    return structure_config(data, cls)
