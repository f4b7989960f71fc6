"""Continuing a previous context token for token (chaining.py), against chat templates
written out here: ChatML-like, and one that renders the last assistant turn with an
empty thinking span but drops it from earlier turns (as Qwen3's does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from erllama.server.chaining import NoContinuation, continuation, turn_close

pytestmark = pytest.mark.anyio

_VOCAB: dict[str, int] = {}


def ids(words: str) -> list[int]:
    """Token ids of space-separated words (one id per distinct word)."""
    return [_VOCAB.setdefault(w, len(_VOCAB) + 1) for w in words.split()]


class Template:
    """``apply_chat_template`` of a word-level model; ``think_last``: the last assistant
    turn after the last user message gets ``<think> </think>`` before its content."""

    def __init__(self, *, think_last: bool = False, default_system: bool = True) -> None:
        self.think_last = think_last
        self.default_system = default_system
        self.calls = 0

    async def apply_chat_template(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        self.calls += 1
        words = ["<s>"]
        if self.default_system and messages[0]["role"] != "system":
            words += ["<start>", "system", "You", "are", "helpful", "<end>"]
        if tools:
            words += ["tools:", *(t["function"]["name"] for t in tools)]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for i, m in enumerate(messages):
            words += ["<start>", m["role"]]
            if self.think_last and m["role"] == "assistant" and i > last_user:
                words += ["<think>", "</think>"]
            words += [*m["content"].split(), "<end>"]
        if add_generation_prompt:
            words += ["<start>", "assistant"]
        return ids(" ".join(words))


def test_a_turn_is_closed_by_what_the_context_does_not_end_with() -> None:
    closing = [2, 198]  # ChatML: <|im_end|> and a newline
    assert turn_close([7, 9, 2], closing) == [198]  # ended by its end-of-generation token
    assert turn_close([7, 9], closing) == [2, 198]  # cut off by a token limit
    assert turn_close([7, 2, 198], closing) == []
    assert turn_close([198], closing) == [2, 198]  # a newline alone closes nothing
    assert turn_close([], [2]) == [2]


PREVIOUS = "<s> <start> user Capital of France? <end> <start> assistant"
NEW = [{"role": "user", "content": "And Italy?"}]
NEXT = "<start> user And Italy? <end> <start> assistant"


@pytest.mark.parametrize("think_last", [False, True])
async def test_the_new_turn_follows_the_context_exactly(think_last: bool) -> None:
    template = Template(think_last=think_last)
    # The model's own tokens: its thinking as generated, and its end-of-generation token.
    context = ids(f"{PREVIOUS} <think> hmm </think> Paris <end>")
    prompt = await continuation(template, "m", context, NEW, None)  # type: ignore[arg-type]
    assert prompt == context + ids(NEXT)


async def test_a_reply_cut_short_gets_its_turn_closed() -> None:
    context = ids(f"{PREVIOUS} Par")
    prompt = await continuation(Template(), "m", context, NEW, None)  # type: ignore[arg-type]
    assert prompt == context + ids(f"<end> {NEXT}")


async def test_tools_and_default_system_prompts_stay_at_the_front() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    context = ids(f"{PREVIOUS} Paris <end>")
    prompt = await continuation(Template(), "m", context, NEW, tools)  # type: ignore[arg-type]
    assert prompt == context + ids(NEXT)  # no tool list, no system prompt in the middle


async def test_a_template_that_renders_no_content_cannot_be_continued() -> None:
    class Blind(Template):
        async def apply_chat_template(self, *args: Any, **kwargs: Any) -> list[int]:
            return ids("<s> <start> user <end>")

    with pytest.raises(NoContinuation):
        await continuation(Blind(), "m", ids("a b"), NEW, None)  # type: ignore[arg-type]
