"""The Ollama and Responses routes on the real model (SmolLM2-135M through llama.cpp, 2
threads, n_ctx 1024, few tokens): what only a real tokenizer, chat template and grammar
can show. Schemas enforced through ``format`` and ``text.format``, a chained conversation
carrying the whole previous context token for token through the real ChatML template (and
restoring the whole previous prompt: padded chunks, the default on the CPU, docs/caching.md
"Padded chunks"; the reply, decoded one token at a time, is fed again), and
the openai-agents SDK forcing a tool call."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import ollama
import openai
import pytest

import erllama
from erllama.backends import llama_cpp, stub
from erllama.bundled import INSTALL_HINT, bundled_model_path
from erllama.server import ServeConfig, ServerConfig

from .conftest import KEY, TOOL_MARKERS, Server, running_server
from .test_responses import run_agent

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

GREEDY: dict[str, Any] = {"temperature": 0.0}
#: Long enough that a conversation's context passes the cache policy's min_tokens (32):
#: shorter ones are neither saved nor kept live for reuse.
INSTRUCTIONS = "You are a helpful assistant. Answer every question in one short word, nothing else."
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
async def smol(anyio_backend: str) -> AsyncIterator[Server]:
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    model = erllama.ModelConfig(
        model_path=path, n_ctx=1024, n_batch=256, n_threads=2, tool_call_markers=TOOL_MARKERS,
    )  # fmt: skip
    config = ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_tokens=200),
        cache=erllama.CacheConfig(ram_file_dir=None),
        models={"smol": model},
    )
    registry = erllama.make_backend_registry({"llama_cpp": llama_cpp, "stub": stub}, autoload=False)
    async with running_server(config, registry) as srv:
        yield srv


def oa(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


async def test_ollama_format_with_a_schema_is_enforced(smol: Server) -> None:
    c = ollama.AsyncClient(host=smol.url, timeout=60)
    question = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]
    r = await c.chat(
        model="smol", messages=question, format=SCHEMA, options={**GREEDY, "num_predict": 40}
    )
    assert json.loads(r.message.content or "")["answer"] in ("yes", "no")
    g = await c.generate(
        model="smol:latest", prompt="Is water wet? Answer in JSON.", format=SCHEMA,
        options={**GREEDY, "num_predict": 40}, stream=False,
    )  # fmt: skip
    assert json.loads(g.response)["answer"] in ("yes", "no")


async def test_responses_text_format_json_schema_is_enforced(smol: Server) -> None:
    async with oa(smol) as c:
        r = await c.responses.create(
            model="smol",
            input="Is the sky blue? Answer in JSON.",
            text={"format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}},
            max_output_tokens=40,
            **GREEDY,
        )
    assert json.loads(r.output_text)["answer"] in ("yes", "no")


async def test_a_chained_conversation_continues_the_whole_previous_context(smol: Server) -> None:
    async with oa(smol) as c:
        turns = []
        previous = None
        for text in ("Name a colour.", "Name another one.", "And a third?"):
            r = await c.responses.create(
                model="smol", input=text, instructions=INSTRUCTIONS,
                previous_response_id=previous, max_output_tokens=8, **GREEDY,
            )  # fmt: skip
            turns.append(r)
            previous = r.id
    for before, after in itertools.pairwise(turns):
        stored = await smol.state.responses.get(before.id)
        assert stored is not None and after.usage is not None
        assert before.usage is not None and after.usage.input_tokens > len(stored.context)
        # The whole previous prompt is restored, never prefilled again.
        cached = after.usage.input_tokens_details.cached_tokens
        assert cached == before.usage.input_tokens > 0
        # Token for token, the next context starts with the previous one (prompt, reply
        # as generated).
        following = await smol.state.responses.get(after.id)
        assert following is not None
        assert list(following.context[: len(stored.context)]) == list(stored.context)


async def test_an_ollama_context_continues_token_for_token(smol: Server) -> None:
    c = ollama.AsyncClient(host=smol.url, timeout=60)
    first = await c.generate(model="smol", prompt="Name a colour.", options={**GREEDY, "num_predict": 6}, stream=False)  # fmt: skip
    context = list(first.context or [])
    second = await c.generate(
        model="smol", prompt="Another?", context=context, options={**GREEDY, "num_predict": 6}, stream=False
    )  # fmt: skip
    assert list(second.context or [])[: len(context)] == context
    hit = smol.engine.model_info("smol").last_cache_hit
    assert first.prompt_eval_count is not None
    assert hit is not None and hit.prefix_len == first.prompt_eval_count > 0


async def test_a_forced_function_call_chains_with_its_exact_tokens(smol: Server) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    }
    async with oa(smol) as c:
        first = await c.responses.create(
            model="smol", input="What is the weather in Paris?", tools=[weather],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, **GREEDY,
        )  # fmt: skip
        (call,) = [i for i in first.output if i.type == "function_call"]
        assert call.name == "get_weather"
        assert isinstance(json.loads(call.arguments)["city"], str)
        second = await c.responses.create(
            model="smol", previous_response_id=first.id, tools=[weather],  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}],
            max_output_tokens=8, **GREEDY,
        )  # fmt: skip
    stored = await smol.state.responses.get(first.id)
    assert stored is not None and second.usage is not None and first.usage is not None
    # The grammar picked the call's tokens; the chained prompt starts with exactly them,
    # and the whole first prompt is restored.
    following = await smol.state.responses.get(second.id)
    assert following is not None
    assert list(following.context[: len(stored.context)]) == list(stored.context)
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached == first.usage.input_tokens > 0


async def test_the_agents_sdk_forces_a_tool_on_smollm2(smol: Server) -> None:
    import anyio

    url = smol.url
    result, calls = await anyio.to_thread.run_sync(
        lambda: run_agent(
            url,
            "smol",
            {"tool_choice": "get_weather", "temperature": 0.0, "max_tokens": 60},
            "What is the weather in Paris?",
        )
    )
    assert len(calls) >= 1 and all(isinstance(city, str) for city in calls)
    first = result.raw_responses[0]
    assert [i.type for i in first.output if i.type == "function_call"] == ["function_call"]
    # The SDK reset tool_choice after the call (its default): the model saw the tool's
    # output and either answered or called again, which ended the run.
    assert len(result.raw_responses) == 2
    assert result.final_output
