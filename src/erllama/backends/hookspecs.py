"""The ``ModelBackend`` hook specification: the seam between the engine and a model runtime.

A backend is a pluggy plugin (a module, or an object) implementing these hooks, registered in
the entry-point group ``erllama.backends`` under the name users pass as ``ModelConfig.backend``::

    [project.entry-points."erllama.backends"]
    mybackend = "my_package.backend"

Each backend gets its own plugin manager, so a hook always has at most one implementation and
"does this backend support X" is "does a hookimpl for X exist" (pluggy drops ``None`` results,
so a ``None`` return can never mean "unsupported").

Threading: each loaded model has one native thread. ``load``, ``step``, ``kv_pack``,
``kv_unpack``, ``seq_rm``, ``embed``, ``sampler_free``, the adapter hooks and ``free`` run
on it, one call at a time, never concurrently with each other. ``tokenize``,
``detokenize``, ``apply_chat_template``, ``sampler_new`` and ``metadata`` read only the
vocabulary and the template: the engine calls them from worker threads, concurrently with
the model thread's hooks and with each other, so they must not touch sequence state.
Hooks may block; they must not touch the event loop.

Errors: raise anything; the engine wraps foreign exceptions in ``BackendError`` with the
original as ``__cause__``. Raise :class:`~erllama.errors.InvalidRequest` for bad caller input
(a grammar that does not parse, a token outside the vocabulary) so it is reported as such and
the model keeps serving. Any other failure from ``step``/``kv_pack``/``kv_unpack``/``seq_rm``
marks the model failed.

Required hooks: load, free, tokenize, detokenize, step, kv_pack, kv_unpack, seq_rm.
Optional hooks, grouped by the capability they provide (``ModelInfo.capabilities``):

* ``chat_template``: apply_chat_template
* ``embed``: embed
* ``sampler``: sampler_new (+ sampler_free) — temperature, top-k/p, min-p, penalties, grammar
* ``adapters``: adapter_load, adapter_free, adapters_apply
* ``metadata``: metadata
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pluggy

from ..config import ModelConfig
from ..sampling import SamplerParams
from .types import ChatMessage, LoadedModel, StepOp, StepResult

__all__ = ["ModelBackend", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("erllama")
hookimpl = pluggy.HookimplMarker("erllama")

REQUIRED_HOOKS = (
    "load",
    "free",
    "tokenize",
    "detokenize",
    "step",
    "kv_pack",
    "kv_unpack",
    "seq_rm",
)

#: Capability name -> the hooks that must all be implemented to provide it.
OPTIONAL_CAPABILITIES: Mapping[str, tuple[str, ...]] = {
    "chat_template": ("apply_chat_template",),
    "embed": ("embed",),
    "sampler": ("sampler_new",),
    "adapters": ("adapter_load", "adapter_free", "adapters_apply"),
    "metadata": ("metadata",),
}


class ModelBackend:
    """Hook specifications. Every hook is ``firstresult``: one backend answers each call."""

    # ---- required -----------------------------------------------------------------------

    @hookspec(firstresult=True)
    def load(self, config: ModelConfig) -> LoadedModel:  # type: ignore[empty-body]
        """Load the model described by ``config`` and create its context.

        Called once per ``Engine.load_model``. Raise on a missing or malformed model file.
        """

    @hookspec(firstresult=True)
    def free(self, model: Any) -> None:
        """Release everything ``load`` allocated, adapters included. Called exactly once,
        after the last step."""

    @hookspec(firstresult=True)
    def tokenize(  # type: ignore[empty-body]
        self, model: Any, text: str, add_special: bool, parse_special: bool
    ) -> Sequence[int]:
        """Text to token ids. ``add_special`` adds BOS (or the model's equivalent);
        ``parse_special`` turns special-token text such as ``<|im_end|>`` into its token."""

    @hookspec(firstresult=True)
    def detokenize(  # type: ignore[empty-body]
        self, model: Any, tokens: Sequence[int], special: bool
    ) -> bytes:
        """Token ids to raw UTF-8 bytes. The bytes of ``[a, b]`` must equal those of ``[a]``
        followed by those of ``[b]``: the engine decodes streams token by token with an
        incremental UTF-8 decoder, so a character split across tokens is never emitted broken.
        ``special``: special tokens (a chat template's markers) as their text, not as
        nothing (an implementation may leave the argument out: pluggy passes only what it
        names)."""

    @hookspec(firstresult=True)
    def step(  # type: ignore[empty-body]
        self,
        model: Any,
        ops: Sequence[StepOp],
        on_sampled: Callable[[int, int], None] | None,
    ) -> Sequence[StepResult]:
        """Run one batched forward step over every admitted sequence.

        ``ops`` holds at most one op per sequence: ``Prefill`` slices and ``Decode`` rows.
        Return one result per op, in any order, each tagged with its ``seq``: ``Prefilled``
        for a prefill, ``Sampled`` for a decode (the sampled token is already in the KV).

        ``on_sampled(seq, token)``, optional to accept and to call: call it as soon as a
        decode row's token is sampled, before the forward pass that puts it in the KV, and the
        engine streams that token one forward pass earlier (time to first token included).
        """

    @hookspec(firstresult=True)
    def kv_pack(self, model: Any, seq: int) -> bytes:  # type: ignore[empty-body]
        """Serialise sequence ``seq``'s KV state (every cell, no logits)."""

    @hookspec(firstresult=True)
    def kv_unpack(self, model: Any, seq: int, data: bytes | bytearray | memoryview) -> None:
        """Replace sequence ``seq``'s KV state with ``data`` from ``kv_pack`` (possibly packed
        from another sequence or another process with the same model and layout). ``data`` is
        bytes-like (a memoryview into a reused buffer for rows read from files): use it during
        the call, do not keep it. The sequence then has no logits until the next prefill."""

    @hookspec(firstresult=True)
    def seq_rm(self, model: Any, seq: int, start: int, end: int | None) -> None:
        """Remove cells ``[start, end)`` of ``seq`` (``end=None``: to the end). The engine
        clears a sequence with ``start=0`` and drops a restored state's last cell with
        ``start=n-1``. Logits of the sequence are invalid afterwards."""

    # ---- optional -------------------------------------------------------------------------

    @hookspec(firstresult=True)
    def apply_chat_template(  # type: ignore[empty-body]
        self,
        model: Any,
        messages: Sequence[ChatMessage],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        verbatim: Sequence[tuple[str, Sequence[int]]],
    ) -> Sequence[int]:
        """Render a conversation with the model's chat template and tokenise it (special
        tokens parsed). Capability ``chat_template``.

        ``verbatim``, optional to accept: ``(text, token ids)`` of replies this model
        generated. Where the rendered text holds one of these texts, use its token ids
        instead of tokenizing it (tokenize only the text around it): a reply replayed in the
        next turn's prompt then matches the KV the model produced, token for token, even
        where the model's tokens were not what the tokenizer would make of the text."""

    @hookspec(firstresult=True)
    def embed(self, model: Any, tokens: Sequence[int]) -> Sequence[float]:  # type: ignore[empty-body]
        """A pooled embedding of ``tokens``. Must not disturb any generation sequence's KV.
        Capability ``embed``."""

    @hookspec(firstresult=True)
    def sampler_new(self, model: Any, params: SamplerParams) -> Any:
        """Build a per-request sampler for ``params`` (grammar included); its result is passed
        back in ``Decode.sampler``. Raise InvalidRequest for a grammar that does not parse.
        Capability ``sampler``; without it only greedy requests are accepted."""

    @hookspec(firstresult=True)
    def sampler_free(self, model: Any, sampler: Any) -> None:
        """Free a sampler from ``sampler_new`` (the request ended)."""

    @hookspec(firstresult=True)
    def adapter_load(self, model: Any, path: str) -> Any:
        """Load a LoRA adapter file; return a handle. Raise if it does not fit the model.
        Capability ``adapters``."""

    @hookspec(firstresult=True)
    def adapter_free(self, model: Any, adapter: Any) -> None:
        """Free an adapter handle; it is no longer in the applied set."""

    @hookspec(firstresult=True)
    def adapters_apply(self, model: Any, adapters: Sequence[tuple[Any, float]]) -> None:
        """Make exactly ``adapters`` (handle, scale) the active set. Called only while no
        sequence is running, so a request is computed with the set it was admitted with."""

    @hookspec(firstresult=True)
    def metadata(self, model: Any) -> Mapping[str, str]:  # type: ignore[empty-body]
        """Descriptive facts (architecture, parameter count ...). Capability ``metadata``."""
