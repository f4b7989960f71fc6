"""Sampler settings of one request, validated at admission."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
#: OpenAI's ranges: presence and frequency penalties in [-2, 2], a logit bias in
#: [-100, 100] (-100 bans a token, 100 all but forces it), at most this many biased tokens.
MAX_OPENAI_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_BIASED_TOKENS = 1024
#: The penalties look back this many tokens by default (llama.cpp's ``repeat_last_n``);
#: -1 means the whole context, 0 turns them off.
DEFAULT_PENALTY_LAST_N = 64
MAX_PENALTY_LAST_N = 1 << 20


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

    grammar -> logit bias -> penalties (repetition, frequency, presence) -> top-k -> top-p
    -> min-p -> (temperature > 0 ? temperature -> draw seeded with ``seed`` : greedy).

    Neutral values switch a stage off: top_k 0, top_p 1, min_p 0, repetition_penalty 1,
    presence and frequency penalties 0, no logit bias, temperature 0 (greedy; the seed is
    then irrelevant). Ranges: temperature [0, 100], top_k >= 0, top_p (0, 1], min_p [0, 1],
    repetition_penalty (0, 100], presence_penalty and frequency_penalty [-2, 2] (OpenAI's),
    penalty_last_n -1 (the whole context) or >= 0, each logit bias [-100, 100] on at most
    1024 token ids, seed [0, 2**32 - 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    #: OpenAI's penalties: subtracted from a token's logit once if it occurred in the
    #: window (presence), and once per occurrence (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: How many recent tokens the penalties look at (-1: the whole context).
    penalty_last_n: int = DEFAULT_PENALTY_LAST_N
    #: (token id, bias added to its logit), sorted by id.
    logit_bias: tuple[tuple[int, float], ...] = ()
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
        presence_penalty: Any = 0.0,
        frequency_penalty: Any = 0.0,
        penalty_last_n: Any = DEFAULT_PENALTY_LAST_N,
        logit_bias: Any = None,
        seed: Any = 0,
        grammar: Any = None,
    ) -> SamplerParams:
        """Validate caller values; an out-of-range one raises InvalidRequest naming it.
        ``logit_bias`` maps token ids (ints, or their decimal strings as JSON carries them)
        to biases; its ids are checked against the vocabulary at intake."""
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
        pp = _openai_penalty("presence_penalty", presence_penalty)
        fp = _openai_penalty("frequency_penalty", frequency_penalty)
        last_n = _integer("penalty_last_n", penalty_last_n)
        if not -1 <= last_n <= MAX_PENALTY_LAST_N:
            raise InvalidRequest(
                "penalty_last_n", f"must be -1 (whole context) or in [0, {MAX_PENALTY_LAST_N}]"
            )
        bias = _logit_bias(logit_bias)
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
            presence_penalty=pp,
            frequency_penalty=fp,
            penalty_last_n=last_n,
            logit_bias=bias,
            seed=s,
            grammar=grammar,
        )

    @property
    def is_greedy_default(self) -> bool:
        """True when every stage is neutral: plain argmax, which every backend must provide."""
        if self.temperature != 0:
            return False
        neutral = attrs.evolve(self, seed=0, penalty_last_n=DEFAULT_PENALTY_LAST_N)
        return neutral == SamplerParams()

    @property
    def penalized(self) -> bool:
        """Any of the penalties is on."""
        return self.penalty_last_n != 0 and (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _openai_penalty(name: str, value: Any) -> float:
    v = _finite(name, value)
    if not -MAX_OPENAI_PENALTY <= v <= MAX_OPENAI_PENALTY:
        raise InvalidRequest(name, f"must be in [-2, 2], got {value!r}")
    return v


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequest("logit_bias", "must be a mapping of token ids to biases")
    if len(value) > MAX_BIASED_TOKENS:
        raise InvalidRequest("logit_bias", f"at most {MAX_BIASED_TOKENS} tokens, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token: Any = key
        if isinstance(key, str):
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequest("logit_bias", f"{key!r} is not a token id") from None
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _U32_MAX:
            raise InvalidRequest("logit_bias", f"{key!r} is not a token id")
        b = _finite(f"logit_bias[{token}]", bias)
        if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias[{token}]", f"must be in [-100, 100], got {bias!r}")
        out[token] = b
    return tuple(sorted(out.items()))


def validate_max_tokens(value: Any) -> int | None:
    """``None`` means until end of generation or a full context."""
    if value is None:
        return None
    n = _integer("max_tokens", value)
    if n < 1:
        raise InvalidRequest("max_tokens", f"must be >= 1, got {value!r}")
    return n
