"""Plain data exchanged between the engine and backend plugins."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "ChatMessage",
    "Decode",
    "LoadedModel",
    "Prefill",
    "Prefilled",
    "Sampled",
    "SeqFailed",
    "StepOp",
    "StepResult",
]

#: A chat message as the chat-template hook receives it: ``{"role": ..., "content": ...}``.
ChatMessage = Mapping[str, Any]


@attrs.frozen(kw_only=True)
class LoadedModel:
    """What ``load`` returns: the backend's own handle plus the facts the engine needs."""

    #: Opaque to the engine; passed back as ``model`` to every other hook.
    handle: Any
    #: Context cells available to one sequence.
    n_ctx: int
    n_vocab: int
    #: Sequences the backend can hold at once (the engine admits at most this many).
    n_seq_max: int = 1
    #: Quantisation label (``q4_1``, ``f16`` ...) for the cache key.
    quant: str = "unknown"
    #: Hex SHA-256 of the weights, when the backend computed one (else the engine decides).
    fingerprint: str | None = None
    #: Backend name and version plus every context parameter that shapes the KV layout.
    #: Folded into the cache key: states saved under one shape never restore into another.
    kv_layout: Mapping[str, Any] = attrs.field(factory=dict)
    #: Token ids that end generation.
    eog_tokens: frozenset[int] = frozenset()
    #: Free-form facts for ``ModelInfo.metadata``.
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    #: The model's chat template source, when it has one: the engine reads thinking and
    #: tool-call markers from it (``<think>``, ``<tool_call>`` ...) unless the config names
    #: them.
    chat_template: str | None = None
    #: What ``step`` offers beyond sampling: ``"logprobs"`` when it fills
    #: ``Sampled.logprob`` for a ``Decode`` that asks (requests for them are refused with
    #: NotSupported otherwise); ``"speculative"`` when it verifies a ``Decode.draft``
    #: (the engine sends drafts only then).
    features: frozenset[str] = frozenset()
    #: A token's KV cell is the same however its prompt was cut into calls (true of a
    #: backend that computes each token on its own). False (the safe default, and
    #: llama.cpp's case) makes the engine reuse prefixes only in whole prefill-grid cells
    #: fed the same way, and never reuse generated tokens' cells (docs/caching.md#exactness).
    batch_invariant: bool = False
    #: Non-zero: ``step`` pads every ``Prefill`` chunk shorter than this many tokens with
    #: filler rows (removed after), so that each prompt token's cell is computed the same
    #: way wherever its chunk starts and whatever else shares the call, except within the
    #: last ``pad_rows - 1`` cells of the context, where there is no room for fillers. The
    #: engine then reuses any prompt prefix (not only whole grid cells), cuts chunks from
    #: where a prompt's feeding starts, and keeps a finished prompt's every cell
    #: (docs/caching.md#padded-chunks). Generated tokens' cells are never reused either way.
    pad_rows: int = 0

    @property
    def fillers_fit_until(self) -> int | None:
        """With padded chunks, the first cell a chunk may start at with no room for fillers
        (its cells are fed alike by every run, and never kept); None without padding."""
        return self.n_ctx - self.pad_rows + 1 if self.pad_rows else None

    def reuse_grid(self, prefill_chunk: int) -> int:
        """The granularity prompt prefixes are reused in: whole prefill-grid cells, or any
        length where cells do not depend on how a prompt was cut (batch invariance,
        padded chunks)."""
        return 1 if self.batch_invariant or self.pad_rows else prefill_chunk

    def chunk_rows(self, prefill_chunk: int) -> int:
        """The tokens a prompt chunk is cut to: G, and with padded chunks at least
        ``pad_rows`` (a shorter chunk would be padded to that many rows, at their cost; a
        small G only ever served to reuse prefixes in smaller cells)."""
        return max(prefill_chunk, self.pad_rows)


@attrs.frozen(kw_only=True)
class Prefill:
    """Decode ``tokens`` into sequence ``seq`` after its current last position.

    ``logits`` asks for the logits of the last token: the engine sets it on a prompt's final
    slice, so the next ``Decode`` of this sequence can sample.
    """

    seq: int
    tokens: Sequence[int]
    logits: bool


@attrs.frozen(kw_only=True)
class Decode:
    """Sample one token for ``seq`` from its latest logits, then decode that token into ``seq``.

    Sample-then-decode keeps the invariant that every token handed back is already in the KV
    cache, so the sequence can be packed right after any step. ``sampler`` is what
    ``sampler_new`` returned, or None for plain greedy (argmax).
    """

    seq: int
    sampler: Any = None
    #: Pick the most likely token (after the sampler's grammar and penalties) instead of
    #: drawing from its distribution: the engine asks for it inside a tool call's syntax,
    #: so the call's bytes are deterministic. The sampler must still account the token
    #: (grammar state, penalty window) as if it had drawn it.
    greedy: bool = False
    #: Report the sampled token's log-probability under the model's own distribution
    #: (log-softmax of the raw logits, before the sampler's changes) and this many most
    #: likely alternatives; None: nothing (backends with the ``logprobs`` feature only).
    logprobs: int | None = None
    #: Speculative decoding (backends with the ``speculative`` feature only; not with
    #: ``logprobs``). After sampling the token, call ``draft(token)``: it proposes tokens
    #: to follow it. Decode the sampled token and the draft in one forward pass with logits
    #: on every row, then keep the longest prefix of the draft that plain decoding would
    #: have produced, place by place, in this op's mode (``greedy``, or the sampler's draw:
    #: the engine cuts drafts where the mode would change): a greedy choice equal to the
    #: drafted token keeps it; a sampler that draws draws once per place, a draw equal to
    #: the drafted token keeps it, and the first draw that differs is the sequence's next
    #: token (the next Decode returns it without drawing again, unless the sequence is fed
    #: or cut first). Account each kept token in the sampler as if sampled, and stop after
    #: an end-of-generation token. Remove the rejected tokens' cells: the sequence's latest
    #: logits are those after the last kept token. ``Sampled.accepted`` and
    #: ``Sampled.drafted`` report it. An empty draft makes this a plain decode.
    draft: Callable[[int], Sequence[int]] | None = None


StepOp = Prefill | Decode


@attrs.frozen(kw_only=True)
class Prefilled:
    seq: int
    n_tokens: int


@attrs.frozen(kw_only=True)
class Sampled:
    seq: int
    token: int
    #: The token ends generation (it is still decoded into the KV).
    eog: bool
    #: When the op asked: the token's log-probability, and the most likely tokens with
    #: theirs, most likely first.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    #: After ``token``, the draft tokens the step accepted (already in the KV, in order),
    #: and how many the draft proposed (``Decode.draft``; 0: none).
    accepted: tuple[int, ...] = ()
    drafted: int = 0


@attrs.frozen(kw_only=True)
class SeqFailed:
    """The op of ``seq`` failed for a reason of its own (its sampler could not compute a
    token, say) and left every sequence's KV as it was before the step: the engine ends
    that one request with ``error`` and the model carries on. A failure that may have
    changed any KV must be raised from ``step`` instead (the model is then failed)."""

    seq: int
    error: BaseException


StepResult = Prefilled | Sampled | SeqFailed
