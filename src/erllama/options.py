"""The keyword arguments a request takes, as typed dictionaries.

``Engine.infer`` spells them out; ``Engine.complete`` and ``Engine.chat`` take them as
``**kwargs: Unpack[...]`` of these, so a type checker catches a misspelt one
(``max_token=``, ``temprature=``) at every call, as it does for ``infer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

__all__ = ["RequestOptions", "SamplingOptions"]


class SamplingOptions(TypedDict, total=False):
    """What every request takes (see ``Engine.infer``)."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    penalty_last_n: int
    logit_bias: Mapping[int | str, float] | None
    logprobs: int | None
    seed: int | None
    grammar: str | None
    stop: str | Sequence[str] | None
    thinking: bool
    thinking_budget_tokens: int | None
    session_id: str | None
    parent_key: str | bytes | None
    cache_salt: str | None
    speculative: bool | None
    draft_max: int | None


class RequestOptions(SamplingOptions, total=False):
    """``Engine.complete``'s: a request's options plus how a text prompt is tokenized."""

    add_special: bool
