"""The server on the real model (SmolLM2-135M through llama.cpp, 2 threads, n_ctx 1024, few
tokens): what only real tokenization and sampling can show. Forced tool calls through a
grammar, their exact replay keeping the prefix cached, JSON output, embeddings, and a
disconnect stopping a real generation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

import erllama
from erllama.backends import llama_cpp, stub
from erllama.bundled import INSTALL_HINT, bundled_model_path
from erllama.server import ServeConfig, ServerConfig

from ..helpers import wait_for
from .conftest import KEY, TOOL_MARKERS, WEATHER_TOOL, Server, running_server

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

GREEDY: dict[str, Any] = {"temperature": 0.0}


@pytest.fixture(scope="module")
async def smol(anyio_backend: str) -> AsyncIterator[Server]:
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    model = erllama.ModelConfig(
        model_path=path, n_ctx=1024, n_batch=256, n_threads=2, tool_call_markers=TOOL_MARKERS
    )
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


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_a_chat_streamed_and_not_gives_the_same_greedy_reply(smol: Server) -> None:
    async with oa(smol) as c:
        whole = await c.chat.completions.create(
            model="smol", messages=user("Name a colour."), max_tokens=8, **GREEDY
        )
        stream = await c.chat.completions.create(
            model="smol", messages=user("Name a colour."), max_tokens=8, stream=True, **GREEDY
        )
        streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
    assert whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens > 0


async def test_a_forced_tool_call_and_its_replay_keep_the_prefix_cached(smol: Server) -> None:
    question = user("What is the weather in Paris?")
    async with oa(smol) as c:
        first = await c.chat.completions.create(
            model="smol",
            messages=question,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
            **GREEDY,
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        assert first.usage is not None
        reused = first.usage.prompt_tokens + first.usage.completion_tokens
        second = await c.chat.completions.create(
            model="smol",
            messages=[
                *question,
                {
                    "role": "assistant",
                    "content": choice.message.content,
                    "tool_calls": [
                        {"id": call.id, "type": "function", "function": {
                            "name": call.function.name, "arguments": call.function.arguments}},
                    ],
                },
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
            ],
            tools=[WEATHER_TOOL],
            max_tokens=8,
            extra_body={"erllama": {"explain_cache": True}},
            **GREEDY,
        )  # fmt: skip
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # The grammar picked the call's tokens, not the tokenizer: the exact replay of those
    # tokens makes the new prompt agree with every token the first request computed, the
    # end-of-turn token sampled last included (not counted in completion_tokens; the
    # replayed history renders it too). Of those, the whole first prompt is restored (padded
    # chunks, the default on the CPU); the call, decoded one token at a time, is prefilled
    # again (docs/caching.md "Exactness"), which the explanation reports as "grid" where it
    # would otherwise say "diverged" at the first token the replay got wrong.
    explained = (second.model_extra or {})["erllama"]["cache"]["explain"]
    assert (explained["cause"], explained["matched"]) == ("grid", reused + 1)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens > 0


async def test_response_format_json_schema_is_enforced(smol: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    async with oa(smol) as c:
        r = await c.chat.completions.create(
            model="smol",
            messages=user("Is the sky blue? Answer in JSON."),
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            max_tokens=40,
            **GREEDY,
        )
    assert json.loads(r.choices[0].message.content or "")["answer"] in ("yes", "no")


async def test_anthropic_stream_and_count_tokens(smol: Server) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=smol.url, api_key=KEY, max_retries=0, timeout=60
    ) as c:
        counted = await c.messages.count_tokens(model="smol", messages=user("Say hi."))
        async with c.messages.stream(
            model="smol", max_tokens=6, messages=user("Say hi."), extra_body=GREEDY
        ) as stream:
            final = await stream.get_final_message()
    assert final.content and final.content[0].type == "text" and final.content[0].text
    usage = final.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens


async def test_embeddings_from_the_real_model(smol: Server) -> None:
    async with oa(smol) as c:
        r = await c.embeddings.create(model="smol", input=["a cat", "a dog"])
    assert len(r.data) == 2 and len(r.data[0].embedding) > 100


async def test_a_disconnect_stops_a_real_generation(smol: Server) -> None:
    async with smol.http() as h:
        body = {"model": "smol", "messages": user("Tell a long story."), "stream": True}
        async with h.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 200}) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data:")
                if n == 3:
                    break
        await wait_for(lambda: smol.engine.status("smol") == "idle", within=10)
        info = smol.engine.model_info("smol")
        assert info.running == 0 and info.queue_len == 0
        after = await h.post(
            "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}
        )
    assert after.status_code == 200
    metrics = smol.state.metrics
    print(
        {
            tuple(s.labels.values()): s.value
            for f in metrics.registry.collect()
            if f.name == "erllama_requests"
            for s in f.samples
        }
    )
    assert metrics.requests.labels("openai", "smol", "disconnected")._value.get() == 1
