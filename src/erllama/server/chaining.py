"""Continuing a conversation from the exact tokens of a previous request.

A chained request (the Responses API's ``previous_response_id``, Ollama's ``context``)
names a previous request whose KV holds exactly ``context``: its prompt, its reply as
generated, and the end-of-generation token. Re-rendering the history through the chat
template would not give those tokens back (the reply re-tokenised, a template that drops
thinking from earlier turns, an end-of-turn the model did not generate), and the cached
prefix would stop matching there. So the next prompt is built on ``context`` itself:

    context + what closes the assistant turn + the new messages + the generation prompt

The last three come from the chat template, rendered in a neutral frame (a short
exchange that ends with an assistant turn):

* what closes an assistant turn is what two renderings of the frame, differing only in the
  assistant's content, end with alike (ChatML: ``<|im_end|>`` and a newline). The part of it
  ``context`` already ends with (the end-of-generation token the model produced) is not
  repeated;
* the new messages are what rendering the frame plus them (with the generation prompt)
  adds to the frame's own rendering. The frame starts the conversation, so a template's
  default system prompt or tool list lands in both renderings and cancels out.

So every chained turn starts with the whole previous context, token for token: its cache
row (or the sequence's live KV) covers all of it. A template that does not render the new
messages as a plain continuation (it reorders or rewrites earlier turns when more follow)
raises :class:`NoContinuation`; the caller then renders the whole conversation.
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
    """The template does not render new messages as a suffix of the conversation."""


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return list(a[len(a) - n :])


def turn_close(context: Sequence[int], closing: Sequence[int]) -> list[int]:
    """The tokens that close the assistant turn ``context`` ends in: ``closing`` less the
    part ``context`` already ends with (the end-of-generation token the model generated,
    when it ended that way; nothing when it was cut off by a token limit)."""
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
    frames = [[_USER, {"role": "assistant", "content": c}] for c in _CONTENTS]
    first = await engine.apply_chat_template(
        model, frames[0], None, tools, add_generation_prompt=False
    )
    second = await engine.apply_chat_template(
        model, frames[1], None, tools, add_generation_prompt=False
    )
    closing = _common_suffix(first, second)
    if not closing or len(closing) == len(first):
        raise NoContinuation("the template closes no assistant turn")
    extended = await engine.apply_chat_template(
        model, [*frames[0], *messages], None, tools, add_generation_prompt=True
    )
    if extended[: len(first)] != first:
        raise NoContinuation("the template rewrites earlier turns when more follow")
    return [*context, *turn_close(context, closing), *extended[len(first) :]]
