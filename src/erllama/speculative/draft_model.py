"""The ``model`` drafter: a second, smaller GGUF with the same vocabulary drafts greedily.

``SpeculativeConfig(drafter="model", options={"model_path": ...})``. The draft model is
loaded once per target model, on the target's thread, right after it (``drafter_load``), and
freed there before it. Its vocabulary must be the target's: the same size, the same
end-of-generation tokens and the same text for a sample of token ids, else the target's load
fails with a ConfigError naming the difference. It runs through erllama's own llama.cpp
model class (the same compute thread, the same exactness settings: flash attention on, one
decode thread), with as many sequences as the target.

A request's drafter claims a draft sequence on its first draft and keeps it while it runs;
when every sequence is claimed, the least recently used one is taken back (its request has
ended, since at most ``n_seq_max`` requests run at once). Each draft first brings the draft
sequence in line with the request's tokens: it drops what the target rejected (``seq_rm``
back to the common prefix) and feeds what is new (the whole prompt on the first draft), then
decodes the draft greedily, one token per pass. Speculation stays exact whatever the draft
model says: the target verifies every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..backends.types import Decode, LoadedModel, Prefill, Sampled
from ..cache.key import common_prefix_tokens, encode_tokens
from ..config import ModelConfig, SpeculativeConfig
from .hookspecs import hookimpl

__all__ = ["DraftModel", "ModelDrafter", "drafter_free", "drafter_load", "drafter_new"]

#: Token ids whose text is compared between the two vocabularies (every n-th id).
VOCAB_SAMPLE_STEP = 97


@attrs.define(eq=False)
class _Slot:
    owner: object = None
    tokens: list[int] = attrs.Factory(list)
    used: int = 0


class DraftModel:
    """The draft model of one target model, and its sequences (the target's thread only)."""

    def __init__(self, llama: Any, n_seq: int) -> None:
        self.llama = llama
        self.slots = [_Slot() for _ in range(n_seq)]
        self._clock = 0

    def claim(self, owner: object) -> int:
        free = [i for i, s in enumerate(self.slots) if s.owner is None]
        seq = free[0] if free else min(range(len(self.slots)), key=lambda i: self.slots[i].used)
        slot = self.slots[seq]
        if slot.tokens:
            self.llama.seq_rm(seq, 0, None)
        slot.owner, slot.tokens = owner, []
        return seq

    def draft(self, seq: int, tokens: Sequence[int], n: int) -> list[int]:
        """Bring sequence ``seq`` to ``tokens``, then decode ``n`` tokens greedily."""
        slot = self.slots[seq]
        self._clock += 1
        slot.used = self._clock
        have = slot.tokens
        common = common_prefix_tokens(encode_tokens(have), encode_tokens(tokens))
        if common == len(tokens):
            common -= 1  # feed the last token again: its logits are what drafting needs
        if common < len(have):
            self.llama.seq_rm(seq, common, None)
            del have[common:]
        rest = list(tokens[common:])
        limit = self.llama.n_batch
        for start in range(0, len(rest), limit):
            chunk = rest[start : start + limit]
            last = start + limit >= len(rest)
            self.llama.step([Prefill(seq=seq, tokens=chunk, logits=last)])
            have.extend(chunk)
        out: list[int] = []
        room = self.llama.n_ctx_seq - len(have)
        for _ in range(min(n, room)):
            (res,) = self.llama.step([Decode(seq=seq)])
            if not isinstance(res, Sampled) or res.eog:
                break
            out.append(res.token)
            have.append(res.token)
        return out

    def close(self) -> None:
        self.llama.free()


class ModelDrafter:
    """One request's drafter over the model's :class:`DraftModel`."""

    def __init__(self, model: DraftModel) -> None:
        self._model = model
        self._seq: int | None = None

    def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
        model = self._model
        if self._seq is None or model.slots[self._seq].owner is not self:
            self._seq = model.claim(self)
        return model.draft(self._seq, [*context, last], n)


def _check_vocab(target: Any, draft: Any) -> None:
    from ..backends.llama_native import LlamaModel

    if not isinstance(target, LlamaModel):
        raise ValueError("the model drafter drafts for llama_cpp models only")
    if draft.n_vocab != target.n_vocab:
        raise ValueError(
            f"the draft model's vocabulary has {draft.n_vocab} tokens, the model's "
            f"{target.n_vocab}: they must be the same vocabulary"
        )
    if draft.eog != target.eog:
        raise ValueError("the draft model ends generation on other tokens than the model")
    for t in range(0, target.n_vocab, VOCAB_SAMPLE_STEP):
        if draft.piece(t, True) != target.piece(t, True):
            raise ValueError(
                f"token {t} is {draft.piece(t, True)!r} in the draft model and "
                f"{target.piece(t, True)!r} in the model: they must be the same vocabulary"
            )


@hookimpl
def drafter_load(config: SpeculativeConfig, model: LoadedModel) -> DraftModel:
    from ..backends.llama_native import LlamaModel

    path = config.options.get("model_path")
    if not isinstance(path, str | Path) or not str(path):
        raise ValueError("options.model_path must name the draft model's GGUF file")
    llama = LlamaModel(
        ModelConfig(
            model_path=Path(path),
            n_ctx=model.n_ctx,
            n_batch=512,
            n_seq_max=model.n_seq_max,
            n_threads=1,
            flash_attn=True,
            embeddings=False,
            # The model's own prompt feeding (padded chunks or the grid), so that the draft
            # model computes a prompt's cells as the model does and drafts what it would.
            options={"pad_prefill": bool(model.pad_rows)},
        )
    )
    try:
        _check_vocab(model.handle, llama)
    except BaseException:
        llama.free()
        raise
    return DraftModel(llama, model.n_seq_max)


@hookimpl
def drafter_new(config: SpeculativeConfig, state: DraftModel | None) -> ModelDrafter:
    if state is None:
        raise ValueError("the model drafter was not loaded with its model")
    return ModelDrafter(state)


@hookimpl
def drafter_free(state: DraftModel) -> None:
    state.close()
