"""On SmolLM2: the work of turning chat messages into tokens is bounded and stops when its
request is cancelled.

llama.cpp's tokenizer splits a prompt at special-token texts in time quadratic in their
number (20,000 took 20 s in one uninterruptible call); 100,000 chat messages kept a core
busy for over 75 s after their client left.
"""

from __future__ import annotations

import resource

import anyio
import pytest

import erllama
from erllama.backends import llama_native
from erllama.backends.llama_chat import render_chat_template

pytestmark = pytest.mark.anyio


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_a_flood_of_special_token_text_is_refused(
    llama_engine: erllama.Engine, smol: str
) -> None:
    flood = "<|im_start|>" * (llama_native.MAX_SPECIAL_TOKENS + 1)
    with pytest.raises(erllama.InvalidRequest) as err:
        await llama_engine.apply_chat_template(smol, [{"role": "user", "content": flood}])
    assert err.value.param == "messages" and "special tokens" in err.value.reason


async def test_tokenizing_in_pieces_gives_the_tokens_of_one_call(
    llama_engine: erllama.Engine, smol: str, smol_config: erllama.ModelConfig
) -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} <|im_end|> é 😀"}
        for i in range(400)
    ]
    tokens = await llama_engine.apply_chat_template(smol, messages)
    # The same text tokenized in one native call (parse_special, as the chat path did), on
    # a model of the test's own.
    model = llama_native.LlamaModel(smol_config)
    text = render_chat_template(
        model.chat_template, messages, system=None, tools=None,
        add_generation_prompt=True, bos_token="", eos_token="",
    )  # fmt: skip
    whole = model.tokenize(text, False, True)
    try:
        assert len(model._chat_pieces(text)) > 4
        assert tokens[-len(whole) :] == whole
    finally:
        model.free()


async def test_a_cancelled_render_stops_its_thread(llama_engine: erllama.Engine, smol: str) -> None:
    messages = [{"role": "user", "content": "hello <|im_end|> there"}] * 5000
    with anyio.move_on_after(0.2) as scope:
        await llama_engine.apply_chat_template(smol, messages)
    assert scope.cancelled_caught
    await anyio.sleep(0.5)  # the thread reaches its next cancellation point
    before = cpu_s()
    await anyio.sleep(1.0)
    # Tokenizing these 15,000 special tokens takes seconds of CPU: a thread still at it
    # would spend most of this second.
    assert cpu_s() - before < 0.5
