"""What the engine hands back: stream events, results and snapshots (all frozen attrs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

__all__ = [
    "AdapterInfo",
    "CacheDelta",
    "CacheHit",
    "CacheHitKind",
    "Completion",
    "Done",
    "Event",
    "FinishReason",
    "ModelInfo",
    "ModelStatus",
    "Stats",
    "Token",
]

#: Why generation ended: an end-of-generation token or stop sequence, the max_tokens budget,
#: or cancellation (cancel(), a closed stream, or the caller's scope).
FinishReason = Literal["stop", "length", "cancelled"]
#: How much of the prompt came from the KV cache: all of it, a prefix, or nothing.
CacheHitKind = Literal["exact", "partial", "cold"]
ModelStatus = Literal["loading", "idle", "prefilling", "generating", "failed", "unloading"]


@attrs.frozen(kw_only=True)
class Token:
    """One generated token. ``text`` may be empty while a multi-byte character is incomplete;
    the bytes then arrive with a later token, never broken."""

    text: str
    token_id: int


@attrs.frozen(kw_only=True)
class CacheDelta:
    """Prompt tokens read from the cache, and tokens this request newly saved beyond them."""

    read: int = 0
    created: int = 0


@attrs.frozen(kw_only=True)
class CacheHit:
    """What the cache lookup at admission found."""

    kind: CacheHitKind
    #: Tokens restored from the cache (0 when cold).
    prefix_len: int
    #: Which lookup found it: exact, parent_key, longest_prefix, the sequence's own live KV
    #: kept from the previous request ("live"), or None when cold.
    source: Literal["exact", "parent", "prefix", "live"] | None = None
    #: The tier the row came from (None for live reuse).
    tier: str | None = None


@attrs.frozen(kw_only=True)
class Stats:
    """Timing and accounting of one request. Times are seconds on the monotonic clock."""

    prompt_tokens: int
    completion_tokens: int
    cache_hit_kind: CacheHitKind
    cache_delta: CacheDelta
    finish_reason: FinishReason
    #: Hex key of the finish save, usable as ``parent_key`` next turn; None if not saved.
    finish_key: str | None
    #: Admission (taken from the queue) until the first token was sampled.
    time_to_first_token_s: float | None
    #: Queue wait before admission.
    queued_s: float
    prefill_s: float
    generation_s: float
    #: Generated tokens per second of generation time.
    tokens_per_s: float | None
    #: Tokens in the sequence's KV at the end (restored + prefilled + generated).
    context_tokens: int


@attrs.frozen(kw_only=True)
class Done:
    """The last event of every stream that did not raise."""

    finish_reason: FinishReason
    stats: Stats


@attrs.frozen(kw_only=True)
class Completion:
    """The result of ``Engine.complete``."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    finish_key: str | None
    cache_hit_kind: CacheHitKind
    cache_delta: CacheDelta
    stats: Stats

    @classmethod
    def build(cls, done: Done, text: str, token_ids: tuple[int, ...]) -> Completion:
        st = done.stats
        return cls(
            text=text,
            token_ids=token_ids,
            finish_reason=done.finish_reason,
            finish_key=st.finish_key,
            cache_hit_kind=st.cache_hit_kind,
            cache_delta=st.cache_delta,
            stats=st,
        )

    @property
    def reply(self) -> str:
        """Alias of ``text`` (the reference library's name)."""
        return self.text

    @property
    def generated(self) -> tuple[int, ...]:
        """Alias of ``token_ids``."""
        return self.token_ids


#: What a stream yields.
Event = Token | Done


@attrs.frozen(kw_only=True)
class AdapterInfo:
    """A LoRA adapter attached to a model."""

    handle: int
    path: str
    scale: float
    sha256: str


@attrs.frozen(kw_only=True)
class ModelInfo:
    """A snapshot of one model, taken without waiting on its worker."""

    id: str
    backend: str
    status: ModelStatus
    model_path: str | None
    #: Optional hooks the backend implements (chat_template, embed, sampler, adapters, ...).
    capabilities: frozenset[str]
    n_ctx: int
    n_seq_max: int
    n_vocab: int
    #: Requests waiting for a sequence.
    queue_len: int
    #: Requests admitted and running.
    running: int
    #: Hex SHA-256 identifying the weights (the GGUF's, unless overridden).
    fingerprint: str
    #: The fingerprint with the current adapter set folded in (what new requests key by).
    effective_fingerprint: str
    quant: str
    last_cache_hit: CacheHit | None
    #: Monotonic time of loading and of the last request admitted.
    loaded_at: float
    last_used: float
    adapters: tuple[AdapterInfo, ...] = ()
    #: Why the model failed, when status is "failed".
    error: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def phase(self) -> ModelStatus:
        """Alias of ``status``."""
        return self.status
