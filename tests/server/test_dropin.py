"""What clients switching from llama-server, vLLM or OpenAI send next (issue 18), on stub
models: tool calls whatever the config, sampling fields, ``n``, ``echo``, embeddings,
llama-server's routes and fields, and the errors they expect. SmolLM2's side (log
probabilities, forced calls without configured markers) is in test_dropin_real.py."""

from __future__ import annotations

import json
from typing import Any

import attrs
import openai
import pytest

from ..helpers import stub_config
from .conftest import CALL_JSON, TOOL_SCRIPT, WEATHER_TOOL, Server, own_model

pytestmark = pytest.mark.anyio


def client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=30)


def user(text: str = "weather?") -> list[Any]:
    return [{"role": "user", "content": text}]


# ---- tool calls whatever the config ----------------------------------------------------------


async def test_a_model_configured_without_markers_still_returns_its_calls(server: Server) -> None:
    # No tool_call_markers in its config, no template naming any: the engine matches
    # Hermes' pair, which is what the server tells such a model to write. (Forced calls
    # need a real grammar sampler: test_dropin_real.py.)
    async with own_model(server, script=TOOL_SCRIPT) as (mid, _), client(server) as c:
        assert server.engine.model_info(mid).tool_call_markers == ("<tool_call>", "</tool_call>")
        r = await c.chat.completions.create(
            model=mid, messages=user(), tools=[WEATHER_TOOL], max_tokens=200
        )
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_without_detect_markers_and_markers_a_call_is_text(server: Server) -> None:
    config = attrs.evolve(stub_config(script=TOOL_SCRIPT), detect_markers=False)
    await server.engine.load_model("unmarked", config)
    try:
        assert server.engine.model_info("unmarked").tool_call_markers is None
        async with client(server) as c:
            r = await c.chat.completions.create(
                model="unmarked", messages=user(), tools=[WEATHER_TOOL], max_tokens=200
            )
    finally:
        await server.engine.unload("unmarked")
    assert CALL_JSON in (r.choices[0].message.content or "")
    assert not r.choices[0].message.tool_calls
