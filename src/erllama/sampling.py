"""Sampler settings of one request, validated at admission."""

from __future__ import annotations

import math
from typing import Any

import attrs

from .errors import InvalidRequest
from .grammar_cost import MAX_GRAMMAR_BYTES

__all__ = ["SamplerParams", "validate_max_tokens"]

_U32_MAX = 2**32 - 1
#: Past these the distribution is already flat (or the penalty total): larger values are
#: refused here, so no backend has to compute with them (1e308 overflows a sampler).
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 100.0


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequest(name, f"must be finite, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    return value


@attrs.frozen(kw_only=True)
class SamplerParams:
    """One request's sampler chain, applied in this order:

    grammar -> repetition penalty -> top-k -> top-p -> min-p ->
    (temperature > 0 ? temperature -> draw seeded with ``seed`` : greedy).

    Neutral values switch a stage off: top_k 0, top_p 1, min_p 0, repetition_penalty 1,
    temperature 0 (greedy; the seed is then irrelevant). Ranges: temperature [0, 100],
    top_k >= 0, top_p (0, 1], min_p [0, 1], repetition_penalty (0, 100], seed [0, 2**32 - 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    #: GBNF grammar text whose ``root`` rule constrains the output.
    grammar: str | None = None

    @classmethod
    def build(
        cls,
        *,
        temperature: Any = 0.0,
        top_k: Any = 0,
        top_p: Any = 1.0,
        min_p: Any = 0.0,
        repetition_penalty: Any = 1.0,
        seed: Any = 0,
        grammar: Any = None,
    ) -> SamplerParams:
        """Validate caller values; an out-of-range one raises InvalidRequest naming it."""
        t = _finite("temperature", temperature)
        if not 0 <= t <= MAX_TEMPERATURE:
            raise InvalidRequest(
                "temperature", f"must be in [0, {MAX_TEMPERATURE}], got {temperature!r}"
            )
        k = _integer("top_k", top_k)
        if k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {top_k!r}")
        p = _finite("top_p", top_p)
        if not 0 < p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p!r}")
        mp = _finite("min_p", min_p)
        if not 0 <= mp <= 1:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {min_p!r}")
        rp = _finite("repetition_penalty", repetition_penalty)
        if not 0 < rp <= MAX_PENALTY:
            raise InvalidRequest(
                "repetition_penalty", f"must be in (0, {MAX_PENALTY}], got {repetition_penalty!r}"
            )
        s = _integer("seed", seed)
        if not 0 <= s <= _U32_MAX:
            raise InvalidRequest("seed", f"must be in [0, 2**32 - 1], got {seed!r}")
        if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
            raise InvalidRequest("grammar", "must be non-empty GBNF text")
        if grammar is not None and len(grammar) > MAX_GRAMMAR_BYTES:
            # The full cost check (grammar_cost) runs where the backend builds the
            # sampler, off the event loop; the size alone is bounded here.
            raise InvalidRequest("grammar", f"is longer than {MAX_GRAMMAR_BYTES} characters")
        return cls(
            temperature=t,
            top_k=k,
            top_p=p,
            min_p=mp,
            repetition_penalty=rp,
            seed=s,
            grammar=grammar,
        )

    @property
    def is_greedy_default(self) -> bool:
        """True when every stage is neutral: plain argmax, which every backend must provide."""
        return attrs.evolve(self, seed=0) == SamplerParams() if self.temperature == 0 else False


def validate_max_tokens(value: Any) -> int | None:
    """``None`` means until end of generation or a full context."""
    if value is None:
        return None
    n = _integer("max_tokens", value)
    if n < 1:
        raise InvalidRequest("max_tokens", f"must be >= 1, got {value!r}")
    return n
