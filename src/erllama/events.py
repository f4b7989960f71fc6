"""What the engine hands back: stream events, results and snapshots (all frozen attrs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

__all__ = [
    "AdapterInfo",
    "CacheDelta",
    "CacheExplanation",
    "CachedPrefix",
    "CachedRow",
    "CacheHit",
    "CacheHitKind",
    "Completion",
    "Verification",
    "Done",
    "Event",
    "FinishReason",
    "ModelInfo",
    "ModelState",
    "ModelStatus",
    "LifecycleState",
    "MissCause",
    "SessionInfo",
    "Stats",
    "ThinkingDelta",
    "ThinkingEnd",
    "Token",
    "TokenLogprob",
    "ToolCallDelta",
    "ToolCallEnd",
]

#: Why generation ended: ``stop`` (an end-of-generation token, or one of the request's stop
#: strings: ``Stats.stop_sequence`` says which), ``length`` (``max_tokens`` or a full
#: context), or ``cancelled`` (cancel(), a closed stream, or the caller's scope).
FinishReason = Literal["stop", "length", "cancelled"]
#: How much of the prompt came from the KV cache: all of it, a prefix, or nothing.
CacheHitKind = Literal["exact", "partial", "cold"]
ModelStatus = Literal["loading", "idle", "prefilling", "generating", "failed", "unloading"]
#: Why a prompt was not wholly restored (:class:`CacheExplanation`; docs/caching.md, "Why
#: did it miss?").
MissCause = Literal[
    "no_row",
    "evicted",
    "fingerprint",
    "adapter",
    "layout",
    "diverged",
    "extends",
    "grid",
    "policy",
    "disabled",
    "shared",
]
#: Where a model the engine knows stands in its lifecycle (``Engine.model_states``).
LifecycleState = Literal["unloaded", "loading", "loaded", "unloading", "failed"]


@attrs.frozen(kw_only=True)
class TokenLogprob:
    """A token and its log-probability under the model's own distribution (log-softmax of
    the raw logits, before temperature, penalties or any other sampler stage)."""

    token_id: int
    #: The token's own bytes (a piece of a multi-byte character is not valid UTF-8 alone).
    piece: bytes
    logprob: float

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


@attrs.frozen(kw_only=True)
class Token:
    """One generated answer token and the text released with it.

    Text is never broken: a character split across tokens, or text that could still be the
    start of a stop string, is held and released with a later token (so ``text`` may be
    empty); what is still held when generation ends comes with the last event before
    ``Done``. The end-of-generation token itself is never streamed.

    With ``logprobs=N`` on the request: ``logprob`` is this token's, and ``top_logprobs``
    the N most likely tokens at its position (an event that only releases held text, at
    the end, carries none).
    """

    text: str
    token_id: int
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@attrs.frozen(kw_only=True)
class ThinkingDelta:
    """Text inside the model's thinking span (requests with ``thinking=True`` on a model
    with thinking markers). The markers themselves are not included."""

    text: str


@attrs.frozen(kw_only=True)
class ThinkingEnd:
    """The thinking span closed (by the model, or by the engine when the request's
    ``thinking_budget_tokens`` ran out). ``signature``: hex HMAC-SHA256 of the span's bytes
    under ``EngineConfig.thinking_signing_key``; None without a key."""

    signature: str | None


@attrs.frozen(kw_only=True)
class ToolCallDelta:
    """A piece of a tool call's text, markers included. A call the request ended inside
    (``max_tokens``, a full context) gets no :class:`ToolCallEnd`: its text comes again as
    the stream's last :class:`Token`, answer text (it is no call)."""

    text: str


@attrs.frozen(kw_only=True)
class ToolCallEnd:
    """A tool call closed. ``text`` is the exact concatenation of its deltas: the bytes to
    replay verbatim in the next turn's prompt so the cached prefix keeps matching."""

    text: str


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
    #: kept from the previous request ("live"), the request's pinned session ("session"),
    #: another request prefilling the same prefix at the same time ("shared": it was
    #: prefilled once, by that request), or None when cold.
    source: Literal["exact", "parent", "prefix", "live", "session", "shared"] | None = None
    #: The tier the row came from (None for live reuse).
    tier: str | None = None


@attrs.frozen(kw_only=True)
class CacheExplanation:
    """Why a prompt was restored as far as it was, and no further (``Stats.cache_explain``,
    ``Engine.explain_prefix``; docs/caching.md, "Why did it miss?").

    ``matched`` is how far the prompt agrees with the nearest thing the engine computed for
    this model: a cache row, a sequence's live KV, or what a finished request computed past
    the row it kept. ``restored`` is at most that: restores keep whole grid cells and
    always leave a token to feed. ``position`` is where the prompt left the nearest row
    (None when the whole prompt matched), and the excerpts show both sides there.
    """

    #: Tokens in the prompt.
    prompt_tokens: int
    #: Prompt tokens restored (not prefilled): ``Stats.cache_delta.read``.
    restored: int
    #: Where they came from: a tier (``ram``, ``ram_file``, ``disk``), ``live`` for a
    #: sequence's own KV, ``shared`` for another request's prefill running at the same time;
    #: None when nothing was restored.
    tier: str | None
    #: Leading prompt tokens the nearest row (or live KV, or a finished request's tokens
    #: past its kept row) agrees with.
    matched: int
    #: What stopped the prompt there; None when the whole prompt matched (an exact hit,
    #: which still re-feeds its last grid cell for the logits a state does not carry).
    cause: MissCause | None
    #: The token position where the prompt left the nearest row; None when nothing was
    #: left (an exact hit, or ``no_row``/``disabled``).
    position: int | None = None
    #: A few prompt tokens before ``position`` (shared with the row), decoded.
    shared_text: str = ""
    #: A few prompt tokens from ``position`` on, decoded, and their ids.
    prompt_text: str = ""
    prompt_ids: tuple[int, ...] = ()
    #: A few of the nearest row's tokens from ``position`` on ("" when the row ends there),
    #: decoded, and their ids. Not given for a row of another namespace (its tokens may
    #: belong to another vocabulary).
    row_text: str = ""
    row_ids: tuple[int, ...] = ()
    #: The nearest row: its key (hex), its length and tier, when it is a cache row (or was,
    #: for ``evicted``).
    row_key: str | None = None
    row_tokens: int | None = None
    row_tier: str | None = None
    #: ``evicted``: when the row was removed (Unix time) and why (``evicted`` by a tier's
    #: budget, ``pressure``, ``gc``, ``corrupt``, or ``deleted`` by another process).
    evicted_at: float | None = None
    evicted_because: str | None = None
    #: ``fingerprint``/``adapter``/``layout``: the fingerprint (hex) the matching row was
    #: saved under.
    row_fingerprint: str | None = None
    #: The model's prefill grid G (``ModelConfig.prefill_chunk``; 1 for a backend whose
    #: cells do not depend on batching).
    grid: int = 1


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
    #: Admission until the prompt's known prefix was in place: the cache lookup and the
    #: restore, or live reuse (part of ``prefill_s``).
    setup_s: float = 0.0
    #: Waiting for another request to prefill the prefix they share, until it was copied
    #: (in-flight sharing; part of ``prefill_s``).
    shared_wait_s: float = 0.0
    #: Admission until the prompt was in the KV (set-up, waits and prefill chunks).
    prefill_s: float
    generation_s: float
    #: Generated tokens per second of generation time.
    tokens_per_s: float | None
    #: Tokens in the sequence's KV at the end (restored + prefilled + generated): what the
    #: finish row and ``finish_key`` cover.
    context_tokens: int
    #: The sampler seed the request ran with (drawn fresh when the request gave none), so
    #: the run can be replayed.
    seed: int = 0
    #: The stop string that ended the request, if one did.
    stop_sequence: str | None = None
    #: The request was cancelled (``finish_reason == "cancelled"``).
    cancelled: bool = False
    #: Why the prompt was restored as far as it was (None for a request that was never
    #: admitted).
    cache_explain: CacheExplanation | None = None
    #: Speculative decoding: tokens drafted, and how many of them the model accepted (each
    #: accepted token is one forward pass saved).
    draft_tokens: int = 0
    draft_accepted: int = 0

    @property
    def committed_tokens(self) -> int:
        """Alias of ``context_tokens`` (the reference's name)."""
        return self.context_tokens


@attrs.frozen(kw_only=True)
class Done:
    """The last event of every stream that did not raise."""

    finish_reason: FinishReason
    stats: Stats
    #: Every token the model generated for this request (thinking and tool calls included,
    #: the end-of-generation token not).
    token_ids: tuple[int, ...] = ()
    #: The token ids now in the sequence's KV (prompt, thinking, tool calls, answer and the
    #: end-of-generation token): the finish row's exact key.
    context: tuple[int, ...] = ()
    #: The exact text of every generated token (thinking, tool calls and a matched stop
    #: string included): what to replay as the assistant's message so the next turn's
    #: prompt matches the KV. None when it is not valid UTF-8 (cut mid-character).
    reply_text: str | None = None


@attrs.frozen(kw_only=True)
class Verification:
    """What ``Engine.verify`` found: how much of a draft the model would have generated
    itself (greedily), and its own next token."""

    #: Leading draft tokens equal to the model's greedy tokens.
    accepted: int
    #: The model's greedy token after them (the first token where it differs from the
    #: draft, or the one after the whole draft); None when generation ended there (an
    #: end-of-generation token, which ``eog`` says, or a full context).
    next_token: int | None
    #: ``next_token`` ends generation (it is an end-of-generation token).
    eog: bool = False


@attrs.frozen(kw_only=True)
class Completion:
    """The result of ``Engine.complete``."""

    #: The answer text (stop string trimmed; thinking and tool calls not included).
    text: str
    #: Every token the model generated (see ``Done.token_ids``).
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    finish_key: str | None
    cache_hit_kind: CacheHitKind
    cache_delta: CacheDelta
    stats: Stats
    #: The token ids in the sequence's KV at the end (see ``Done.context``).
    context_tokens: tuple[int, ...] = ()
    #: The thinking text (``thinking=True``), and its signature.
    thinking: str = ""
    thinking_signature: str | None = None
    #: Each tool call's exact text, markers included, in order (a call cut off by the
    #: end of the request is answer text, in ``text``).
    tool_calls: tuple[str, ...] = ()
    #: With ``logprobs=N``: each answer token's log-probability and its N alternatives.
    logprobs: tuple[tuple[TokenLogprob, tuple[TokenLogprob, ...]], ...] = ()

    @classmethod
    def build(
        cls,
        done: Done,
        text: str,
        *,
        thinking: str = "",
        thinking_signature: str | None = None,
        tool_calls: tuple[str, ...] = (),
        logprobs: tuple[tuple[TokenLogprob, tuple[TokenLogprob, ...]], ...] = (),
    ) -> Completion:
        st = done.stats
        return cls(
            text=text,
            token_ids=done.token_ids,
            finish_reason=done.finish_reason,
            finish_key=st.finish_key,
            cache_hit_kind=st.cache_hit_kind,
            cache_delta=st.cache_delta,
            stats=st,
            context_tokens=done.context,
            thinking=thinking,
            thinking_signature=thinking_signature,
            tool_calls=tool_calls,
            logprobs=logprobs,
        )

    @property
    def reply(self) -> str:
        """Alias of ``text`` (the reference library's name)."""
        return self.text

    @property
    def generated(self) -> tuple[int, ...]:
        """Alias of ``token_ids``."""
        return self.token_ids

    @property
    def committed_tokens(self) -> int:
        """Tokens in the sequence's KV at the end."""
        return self.stats.context_tokens

    @property
    def stop_sequence(self) -> str | None:
        return self.stats.stop_sequence

    @property
    def cancelled(self) -> bool:
        return self.stats.cancelled


#: What a stream yields.
Event = Token | ThinkingDelta | ThinkingEnd | ToolCallDelta | ToolCallEnd | Done


@attrs.frozen(kw_only=True)
class AdapterInfo:
    """A LoRA adapter attached to a model."""

    handle: int
    path: str
    scale: float
    sha256: str


@attrs.frozen(kw_only=True)
class CachedPrefix:
    """A prefix a model could serve without prefilling it."""

    #: Its length in tokens (0: nothing cached).
    tokens: int
    #: Where it is: ``ram``, ``ram_file``, ``disk`` (a cache row, restored at admission) or
    #: ``live`` (a sequence's own KV); None when nothing is cached.
    tier: str | None
    #: The row's key (hex): for rows listed by ``list_cached_prefixes``, and for the row
    #: ``longest_cached_prefix`` found (which may run past the prompt: the lookup trims it).
    key: str | None = None


@attrs.frozen(kw_only=True)
class CachedRow:
    """One cache row, as :meth:`erllama.Engine.cache_row` reports it."""

    #: Its key (hex).
    key: str
    #: The exact token prefix its state holds.
    tokens: tuple[int, ...]
    #: ``ram``, ``ram_file`` or ``disk``.
    tier: str
    #: ``writing`` from its reservation until published, then ``available``.
    status: str
    #: Bytes of its state.
    size: int
    #: Why it was saved (cold, continued, finish, evict, shutdown, import ...).
    reason: str
    #: Lookups that restored it.
    hits: int


@attrs.frozen(kw_only=True)
class SessionInfo:
    """A session pinned to one of a model's sequences."""

    id: str
    #: Tokens its sequence's KV holds.
    tokens: int
    #: Monotonic time its last request ended; None while one runs.
    idle_since: float | None


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
    #: Sessions pinned to a sequence (they count against ``n_seq_max``).
    sessions: tuple[SessionInfo, ...] = ()
    #: The markers in effect (the config's, or those the chat template names), or None.
    thinking_markers: tuple[str, str] | None = None
    tool_call_markers: tuple[str, str] | None = None
    #: Why the model failed, when status is "failed".
    error: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    #: Exclusive changes (adapter loads, unloads, scales) queued or running: each waits
    #: until no request is admitted.
    pending_changes: int = 0

    @property
    def phase(self) -> ModelStatus:
        """Alias of ``status``."""
        return self.status


@attrs.frozen(kw_only=True)
class ModelState:
    """One model the engine knows, loaded or not (``Engine.model_states``): its lifecycle
    state, when it was last used and when it unloads if it stays idle. Times are Unix
    times (``time.time()``)."""

    id: str
    state: LifecycleState
    #: The keep-alive rule in force: the config's, or the last use's override. None: kept
    #: loaded for good; 0: unloaded once idle.
    keep_alive_s: float | None
    #: When it was last used: a call ended, a request ended, or a hold was released.
    last_used_at: float | None
    #: When it unloads if nothing uses it before (None: never, or it is not loaded). A model
    #: in use past this time unloads once idle.
    expires_at: float | None
    #: When its current load finished (None while not loaded).
    loaded_at: float | None
    #: From the engine's config or ``register_model``: an unload leaves it known, and its
    #: next use loads it again. Otherwise it came from ``load_model``, and an explicit
    #: unload forgets it.
    configured: bool
    #: Calls holding it loaded now (``Engine.hold`` and the engine's own calls).
    holds: int
    #: Times it was loaded, and unloaded by reason (``keep_alive``, ``max_loaded_models``,
    #: ``pressure``, ``unload``).
    loads: int
    unloads: Mapping[str, int] = attrs.field(factory=dict)
    #: Why its last load failed (cleared by the next successful load).
    last_error: str | None = None
    #: The model's snapshot while loaded, else the last one taken before it unloaded (None:
    #: never loaded).
    info: ModelInfo | None = None
