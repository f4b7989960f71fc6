"""Two agent frameworks from the ecosystem, driven against the server as their users drive
a hosted model: a tool round trip each (the model calls the tool, the framework runs it and
sends the result back, the model answers). Forced calls on SmolLM2 (a real grammar), and
``auto`` with the stub scripted to call once and then answer.

langchain-openai's ``ChatOpenAI`` and pydantic-ai's ``OpenAIChatModel`` both speak chat
completions through the official ``openai`` package."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import attrs
import pytest
import sniffio
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities.abstract import AbstractCapability
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

import erllama
from erllama.backends import llama_cpp, stub
from erllama.bundled import INSTALL_HINT, bundled_model_path
from erllama.plugins import BackendRegistry
from erllama.server import ServeConfig, ServerConfig

from ..helpers import stub_config
from .conftest import KEY, TOOL_SCRIPT, Server, running_server

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

#: The stub's answer once the prompt holds the tool's result.
ANSWER = "It is sunny in Paris"


@pytest.fixture(scope="module")
async def agents_server(anyio_backend: str) -> AsyncIterator[Server]:
    """A stub that calls get_weather, then answers once the result is back; and SmolLM2
    from a config without tool-call markers (what a user's config file often is)."""
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    caller = attrs.evolve(
        stub_config(script=TOOL_SCRIPT),
        options={"script": TOOL_SCRIPT, "after_tool": ANSWER},
    )
    smol = erllama.ModelConfig(model_path=path, n_ctx=1024, n_batch=256, n_threads=2)
    config = ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_tokens=200, api_keys=(KEY,)),
        cache=erllama.CacheConfig(ram_file_dir=None),
        models={"caller": caller, "smol": smol},
    )
    registry: BackendRegistry = erllama.make_backend_registry(
        {"llama_cpp": llama_cpp, "stub": stub}, autoload=False
    )
    async with running_server(config, registry) as srv:
        yield srv


# ---- langchain-openai --------------------------------------------------------------------------


def langchain_model(server: Server, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=server.url + "/v1", api_key=KEY, temperature=0, max_retries=0,
        max_tokens=200,
    )  # fmt: skip


async def langchain_round_trip(
    server: Server, model: str, **bind: Any
) -> tuple[Any, Any, list[str]]:
    cities: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    chat = langchain_model(server, model).bind_tools([get_weather], **bind)
    history: list[Any] = [HumanMessage("What is the weather in Paris?")]
    first = await invoke(chat, history)
    history.append(first)
    for call in first.tool_calls:
        history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    second = await invoke(langchain_model(server, model).bind_tools([get_weather]), history)
    return first, second, cities


async def invoke(chat: Any, history: list[Any]) -> Any:
    """``ainvoke`` on asyncio; on trio the sync ``invoke`` in a worker thread, as a trio
    program uses langchain (its async side runs on asyncio's loop only)."""
    if sniffio.current_async_library() == "asyncio":
        return await chat.ainvoke(history)
    return await anyio.to_thread.run_sync(chat.invoke, history)


async def test_langchain_auto_tool_round_trip(agents_server: Server) -> None:
    first, second, cities = await langchain_round_trip(agents_server, "caller")
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    assert cities == ["Paris"]
    assert second.content == ANSWER and not second.tool_calls


async def test_langchain_forced_tool_round_trip_on_smollm2(agents_server: Server) -> None:
    first, second, cities = await langchain_round_trip(
        agents_server, "smol", tool_choice="get_weather"
    )
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    assert cities == [call["args"]["city"]]
    # The model got the result back and answered (what it says is SmolLM2's business).
    assert second.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


# ---- pydantic-ai --------------------------------------------------------------------------------


def pydantic_agent(server: Server, model: str, **kw: Any) -> tuple[Agent[None, str], list[str]]:
    provider = OpenAIProvider(base_url=server.url + "/v1", api_key=KEY)
    agent: Agent[None, str] = Agent(OpenAIChatModel(model, provider=provider), **kw)
    cities: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    return agent, cities


@dataclass
class CallFirst(AbstractCapability[None]):
    """Force a call of ``tool`` on the run's first step, then let the model answer (the
    per-step ``tool_choice`` pydantic-ai documents)."""

    tool: str

    def get_model_settings(self) -> Any:
        def settings(ctx: RunContext[None]) -> ModelSettings:
            return {"tool_choice": [self.tool] if ctx.run_step <= 1 else "none"}

        return settings


async def run_agent(agent: Agent[None, str], prompt: str) -> Any:
    """``run`` on asyncio; on trio ``run_sync`` in a worker thread (pydantic-ai runs on
    asyncio's loop only)."""
    if sniffio.current_async_library() == "asyncio":
        return await agent.run(prompt)
    return await anyio.to_thread.run_sync(agent.run_sync, prompt)


async def test_pydantic_ai_auto_tool_round_trip(agents_server: Server) -> None:
    agent, cities = pydantic_agent(agents_server, "caller")
    result = await run_agent(agent, "What is the weather in Paris?")
    assert cities == ["Paris"]
    assert result.output == ANSWER


async def test_pydantic_ai_forced_tool_round_trip_on_smollm2(agents_server: Server) -> None:
    agent, cities = pydantic_agent(
        agents_server, "smol", capabilities=[CallFirst("get_weather")],
        model_settings={"temperature": 0.0, "max_tokens": 60},
    )  # fmt: skip
    result = await run_agent(agent, "What is the weather in Paris?")
    (city,) = cities  # called once, forced, with arguments its schema admits
    assert isinstance(city, str)
    # The result went back; the model's answer ended the run.
    assert isinstance(result.output, str) and result.output
    returns = [p for m in result.all_messages() for p in m.parts if p.part_kind == "tool-return"]
    assert [r.content for r in returns] == [f"sunny in {city}"]
