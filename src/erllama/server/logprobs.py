"""Log probabilities in OpenAI's two shapes: chat's ``logprobs.content`` (one entry per
token: ``token``, ``logprob``, ``bytes``, ``top_logprobs``) and legacy completions'
parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

The values are the engine's: the log-softmax of the model's raw logits at each position,
before temperature, penalties or a grammar (see :class:`erllama.TokenLogprob`), the
distribution a greedy request samples from. A token's ``bytes`` are its own (a piece of a
multi-byte character is not valid UTF-8 alone; ``token`` then shows U+FFFD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..events import TokenLogprob
from .body import Fields
from .generation import LogprobEntry

__all__ = ["FLOOR", "chat_logprobs", "chat_request", "completion_logprobs", "completion_request"]

#: What a log-probability of minus infinity (a token a logit bias or the vocabulary rules
#: out) is sent as: JSON has no infinity, and OpenAI sends this value for such tokens.
FLOOR = -9999.0
#: Most alternatives per token (OpenAI's ``top_logprobs`` limit).
MAX_TOP = 20


def _value(lp: TokenLogprob) -> float:
    return lp.logprob if math.isfinite(lp.logprob) else FLOOR


def chat_request(body: Fields) -> int | None:
    """Chat's ``logprobs`` (true or false) and ``top_logprobs`` (0 to 20, with
    ``logprobs``) as the engine's ``logprobs`` (None: not asked)."""
    wanted = body.flag("logprobs")
    top = body.integer("top_logprobs", minimum=0, maximum=MAX_TOP)
    if top is not None and not wanted:
        raise body.bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def completion_request(body: Fields) -> int | None:
    """Legacy completions' integer ``logprobs`` (0 to 20 alternatives) as the engine's."""
    return body.integer("logprobs", minimum=0, maximum=MAX_TOP)


def _chat_token(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.text, "logprob": _value(lp), "bytes": list(lp.piece)}


def chat_logprobs(entries: Sequence[LogprobEntry]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one streamed chunk)."""
    return {
        "content": [
            {**_chat_token(lp), "top_logprobs": [_chat_token(t) for t in top]}
            for lp, top in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a legacy completion: ``text_offset`` counts characters
    from ``offset`` (where the completion's text starts in ``text``: after an echoed
    prompt, or after the chunks streamed before)."""
    tokens, values, tops, offsets = [], [], [], []
    at = offset
    for lp, top in entries:
        tokens.append(lp.text)
        values.append(_value(lp))
        alternatives: dict[str, float] = {}
        for t in top:  # two tokens of one text: the likelier one's value
            alternatives[t.text] = max(alternatives.get(t.text, FLOOR), _value(t))
        tops.append(alternatives)
        offsets.append(at)
        at += len(lp.text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
