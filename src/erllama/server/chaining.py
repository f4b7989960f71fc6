"""Continuing a conversation from the exact tokens of a previous request.

A chained request (the Responses API's ``previous_response_id``, Ollama's ``context``)
names a previous request whose KV holds exactly ``context``: its prompt, its reply as
generated, and the end-of-generation token. Re-rendering the history through the chat
template would not give those tokens back (the reply re-tokenised, a template that drops
thinking from earlier turns, an end-of-turn the model did not generate), and the cached
prefix would stop matching there. So the next prompt is built on ``context`` itself:

    context + what closes the assistant turn + the new messages + the generation prompt

The last three come from the chat template: render a neutral frame (a short exchange
ending in an assistant turn) followed by the new messages twice, the assistant's content
differing; what the two renderings end with alike is what follows an assistant's content:
the turn's close (ChatML: ``<|im_end|>`` and a newline), the new messages and the
generation prompt. The part of the close that ``context`` already ends with (the
end-of-generation token the model produced) is not repeated. The frame starts the
conversation, so a template's default system prompt or tool list stays at the front, and
the frame's assistant turn is history in both renderings, so a template that renders the
last assistant turn differently (with an empty thinking span, say) changes nothing.

So every chained turn starts with the whole previous context, token for token: its cache
row (or the sequence's live KV) covers all of it. A template whose two renderings have no
common end, or nothing but it, raises :class:`NoContinuation`; the caller then renders the
whole conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .port import EnginePort

__all__ = ["NoContinuation", "continuation", "turn_close"]

#: The neutral frame: one exchange, the assistant's content varied to find its closing.
#: The two contents end in different characters, so their common suffix is the template's
#: alone.
_USER = {"role": "user", "content": "Hi."}
_CONTENTS = ("Yes", "No")


class NoContinuation(Exception):
    """The template gives no common ending after an assistant's content to continue with."""


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The tokens ``a`` and ``b`` both end with."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return list(a[len(a) - n :])


def turn_close(context: Sequence[int], closing: Sequence[int]) -> list[int]:
    """What follows ``context`` (which ends in an assistant's reply) when ``closing`` (the
    turn's close, and what comes after it) follows an assistant's content: ``closing``
    less the part ``context`` already ends with (the end-of-generation token the model
    generated, when it ended that way; nothing when it was cut off by a token limit)."""
    for k in range(len(closing), 0, -1):
        if len(context) >= k and list(context[len(context) - k :]) == list(closing[:k]):
            return list(closing[k:])
    return list(closing)


async def continuation(
    engine: EnginePort,
    model: str,
    context: Sequence[int],
    messages: Sequence[Mapping[str, str]],
    tools: Sequence[Mapping[str, Any]] | None,
) -> list[int]:
    """The prompt continuing ``context`` (a previous request's KV, ending in its reply) with
    ``messages`` (the new turns), ending in the generation prompt. NoContinuation when the
    template does not allow it; the engine's errors (InvalidRequest naming ``messages``)
    pass through."""
    renderings = [
        await engine.apply_chat_template(
            model, [_USER, {"role": "assistant", "content": c}, *messages], None, tools
        )
        for c in _CONTENTS
    ]
    tail = _common_suffix(*renderings)
    if not tail or len(tail) == min(len(r) for r in renderings):
        raise NoContinuation("the template renders no assistant content before new turns")
    return [*context, *turn_close(context, tail)]
