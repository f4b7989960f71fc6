"""Issue 18's items where a real model matters, on SmolLM2 (llama.cpp, 2 threads): log
probabilities as OpenAI's shapes carry them, compared with the engine's own (which
tests/real/test_sampling_real.py checks against an independent reference); forced tool
calls on models whose config names no markers; llama-server's grammar fields enforced."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import attrs
import openai
import pytest

import erllama
from erllama.backends import llama_cpp, stub
from erllama.bundled import INSTALL_HINT, bundled_model_path
from erllama.server import ServeConfig, ServerConfig

from .conftest import KEY, WEATHER_TOOL, Server, running_server

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
async def smol(anyio_backend: str) -> AsyncIterator[Server]:
    """SmolLM2 twice, neither with tool-call markers in its config: ``smol`` as a config
    file usually has it, ``bare`` with marker detection off (the engine marks no calls)."""
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    model = erllama.ModelConfig(model_path=path, n_ctx=1024, n_batch=256, n_threads=2)
    config = ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_tokens=200),
        cache=erllama.CacheConfig(ram_file_dir=None),
        models={"smol": model, "bare": attrs.evolve(model, detect_markers=False)},
    )
    registry = erllama.make_backend_registry({"llama_cpp": llama_cpp, "stub": stub}, autoload=False)
    async with running_server(config, registry) as srv:
        yield srv


def oa(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- log probabilities ------------------------------------------------------------------------


async def test_chat_logprobs_are_the_engines_for_the_same_greedy_request(smol: Server) -> None:
    prompt = await smol.engine.apply_chat_template("smol", QUESTION)
    reference = await smol.engine.complete(
        "smol", prompt, max_tokens=12, temperature=0.0, logprobs=3
    )
    async with oa(smol) as c:
        whole = await c.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=12, temperature=0,
            logprobs=True, top_logprobs=3,
        )  # fmt: skip
        stream = await c.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=12, temperature=0,
            logprobs=True, top_logprobs=3, stream=True,
        )  # fmt: skip
        streamed = [e async for ch in stream if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content or []]  # fmt: skip
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.content
    assert whole.choices[0].message.content == reference.text
    assert len(lp.content) == len(reference.logprobs)
    for got, (token, top) in zip(lp.content, reference.logprobs, strict=True):
        assert bytes(got.bytes or []) == token.piece
        assert got.logprob == pytest.approx(token.logprob, abs=1e-6)
        assert [bytes(t.bytes or []) for t in got.top_logprobs] == [t.piece for t in top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in top], abs=1e-6
        )
        # Greedy: the token taken is the likeliest one.
        assert got.logprob == pytest.approx(got.top_logprobs[0].logprob, abs=1e-6)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in lp.content]


async def test_legacy_logprobs_are_the_engines_for_the_same_greedy_prompt(smol: Server) -> None:
    reference = await smol.engine.complete(
        "smol", "The sky is", max_tokens=8, temperature=0.0, logprobs=2
    )
    async with oa(smol) as c:
        r = await c.completions.create(
            model="smol", prompt="The sky is", max_tokens=8, temperature=0, logprobs=2
        )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert r.choices[0].text == reference.text
    assert lp.tokens == [t.text for t, _ in reference.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t, _ in reference.logprobs], abs=1e-6)
    assert lp.top_logprobs is not None
    for top, (_, ref_top) in zip(lp.top_logprobs, reference.logprobs, strict=True):
        assert top == pytest.approx({t.text: t.logprob for t in ref_top}, abs=1e-6)


# ---- forced tool calls whatever the config -----------------------------------------------------


@pytest.mark.parametrize("model", ["smol", "bare"])
async def test_a_forced_call_comes_back_as_a_call_without_configured_markers(
    smol: Server, model: str
) -> None:
    async with oa(smol) as c:
        r = await c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60, temperature=0,
        )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


async def test_anthropic_any_forces_a_tool_use_block(smol: Server) -> None:
    async with anthropic.AsyncAnthropic(base_url=smol.url, api_key=KEY, max_retries=0) as a:
        m = await a.messages.create(
            model="smol", max_tokens=60, tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[{"name": "get_weather", "description": "Current weather",
                    "input_schema": WEATHER_TOOL["function"]["parameters"]}],  # type: ignore[index]
            extra_body={"temperature": 0},
        )  # fmt: skip
    assert m.stop_reason == "tool_use"
    (block,) = [b for b in m.content if b.type == "tool_use"]
    assert block.name == "get_weather" and isinstance(block.input, dict)


# ---- llama-server's constraints ---------------------------------------------------------------


async def test_grammar_and_json_schema_are_enforced(smol: Server) -> None:
    async with oa(smol) as c:
        yes_no = await c.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Is the sky green?"}],
            max_tokens=5, extra_body={"grammar": 'root ::= "yes" | "no"'},
        )  # fmt: skip
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {"colour": {"type": "string", "maxLength": 12}},
            "required": ["colour"],
        }
        as_json = await c.completions.create(
            model="smol", prompt="A colour as JSON:", max_tokens=40, temperature=0,
            extra_body={"json_schema": schema},
        )  # fmt: skip
        legacy_object = await c.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=40, temperature=0,
            response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
        )  # fmt: skip
        with pytest.raises(openai.BadRequestError) as bad:
            await c.chat.completions.create(
                model="smol", messages=QUESTION, max_tokens=5,
                extra_body={"grammar": "root ::= ( "},
            )  # fmt: skip
    assert yes_no.choices[0].message.content in ("yes", "no")
    for text in (as_json.choices[0].text, legacy_object.choices[0].message.content or ""):
        assert set(json.loads(text)) == {"colour"}
    assert bad.value.param == "grammar"
