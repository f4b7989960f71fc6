"""Every turn replayed exactly, on SmolLM2 through the official openai client, across a
restart (docs/tool-calls.md#exact-replay).

A six-turn conversation, once for each way clients send a reply back: (a) unchanged, (b)
with its trailing whitespace stripped, (c) without its thinking span (this route returns it in the content; the client cuts
it), (d) with its tool call's
arguments re-serialized. Grammars make (b) end every reply with a newline and (c) open
every reply with a thinking span, so each case really differs from the reply the model
produced. The server restarts between turns 3 and 4, over the same cache directory.

What must hold at every later turn:

- the prompt agrees with every token the model computed last turn (its prompt, its reply
  and the end-of-turn token): the explanation's ``matched`` (the nearest row plus what the
  exactness rule dropped, known to the process that computed it: not after the restart);
- ``cached_tokens`` covers the previous prompt's whole grid cells: the most the exactness
  rule (docs/caching.md#exactness) lets a prompt reuse, and only reachable when every
  earlier reply was replayed token for token;
- the greedy reply equals a cold run of the same prompt tokens on an engine of its own
  with the cache off (for (a)-(c); (d)'s prompt is rendered by the server's tool-call
  code, which the test does not repeat).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest

import erllama
from erllama.backends import llama_cpp, stub
from erllama.bundled import INSTALL_HINT, bundled_model_path
from erllama.server import ServeConfig, ServerConfig

from .conftest import KEY, THINK_MARKERS, TOOL_MARKERS, WEATHER_TOOL, Server, running_server

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

#: The prefill grid (ModelConfig.prefill_chunk) and the turns.
GRID = 64
TURNS = 6
RESTART_AFTER = 3
MAX_TOKENS = 24
QUESTIONS = [
    "Name a fruit.",
    "Name a colour.",
    "Name a city.",
    "Name an animal.",
    "Name a river.",
    "Name a tree.",
]
#: Long enough that the first prompt is saved (CachePolicy.cold_min_tokens).
SYSTEM = (
    "You are a terse assistant for a word game. Answer every question with one short "
    "sentence naming one thing, and nothing else. Never explain, never list, never ask. "
) * 5
#: (b): every reply ends with a newline, which the client strips.
NEWLINE_GRAMMAR = 'root ::= [A-Za-z ,]{2,40} "." "\\n"'
#: (c): every reply opens with a thinking span, which the client drops.
THINKING_GRAMMAR = 'root ::= "<think>" [a-z ]{2,30} "</think>" [A-Za-z ,]{2,30} "."'


def model_config() -> erllama.ModelConfig:
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    return erllama.ModelConfig(
        model_path=path,
        n_ctx=2048,
        n_batch=256,
        n_threads=2,
        prefill_chunk=GRID,
        tool_call_markers=TOOL_MARKERS,
        thinking_markers=THINK_MARKERS,
    )


REGISTRY = erllama.make_backend_registry({"llama_cpp": llama_cpp, "stub": stub}, autoload=False)


@asynccontextmanager
async def serving(cache_dir: Path) -> AsyncIterator[Server]:
    config = ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_tokens=200),
        # The disk tier only: a restart finds everything there, rows and records alike.
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=cache_dir),
        models={"smol": model_config()},
    )
    async with running_server(config, REGISTRY) as srv:
        yield srv


def client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


class Cold:
    """The reference: each prompt's greedy reply on an engine of its own, cache off."""

    def __init__(self, engine: erllama.Engine) -> None:
        self.engine = engine

    async def reply(self, prompt: list[int], grammar: str | None) -> str:
        """The text of every token generated (the end-of-turn token not included)."""
        options: dict[str, Any] = {"grammar": grammar} if grammar else {}
        r = await self.engine.complete(
            "smol", prompt, max_tokens=MAX_TOKENS, temperature=0.0, **options
        )
        assert r.cache_hit_kind == "cold"
        return await self.engine.detokenize("smol", r.token_ids)


@pytest.fixture
async def cold(anyio_backend: str) -> AsyncIterator[Cold]:
    del anyio_backend
    off = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(off, backends=REGISTRY) as engine:
        # No live KV either: every prompt there is prefilled from position 0.
        await engine.load_model("smol", attrs.evolve(model_config(), keep_live_kv=False))
        yield Cold(engine)


def send_back(case: str, message: Any) -> dict[str, Any]:
    """The assistant message as the client of ``case`` sends it back."""
    content = message.content or ""
    if case == "trimmed":
        assert content.endswith("\n"), "the grammar ends every reply with a newline"
        return {"role": "assistant", "content": content.rstrip()}
    if case == "reasoning dropped":
        # This route returns the span in the content (docs/server.md); the client cuts it.
        head, sep, answer = content.partition("</think>")
        assert head.startswith("<think>") and sep, "the grammar opens every reply thinking"
        return {"role": "assistant", "content": answer}
    if case == "tool call re-serialized":
        (call,) = message.tool_calls
        arguments = json.dumps(json.loads(call.function.arguments), indent=2)
        assert arguments != call.function.arguments
        return {
            "role": "assistant",
            "content": content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            ],
        }
    return {"role": "assistant", "content": content}


def request(case: str, messages: list[Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": "smol",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "extra_body": {"erllama": {"explain_cache": True}},
    }
    if case == "trimmed":
        kwargs["extra_body"]["grammar"] = NEWLINE_GRAMMAR
    if case == "reasoning dropped":
        kwargs["extra_body"]["grammar"] = THINKING_GRAMMAR
    if case == "tool call re-serialized":
        kwargs["tools"] = [WEATHER_TOOL]
        kwargs["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
        kwargs["max_tokens"] = 60
    return kwargs


@pytest.mark.parametrize(
    "case", ["unchanged", "trimmed", "reasoning dropped", "tool call re-serialized"]
)
async def test_a_six_turn_conversation_stays_cached_however_the_client_sends_replies_back(
    case: str, cold: Cold, tmp_path: Path
) -> None:
    messages: list[Any] = [{"role": "system", "content": SYSTEM}]
    previous: Any = None  # the previous turn's usage
    turn = 0
    for part in (range(RESTART_AFTER), range(RESTART_AFTER, TURNS)):
        async with serving(tmp_path / "cache") as srv, client(srv) as c:
            for turn in part:
                messages.append({"role": "user", "content": QUESTIONS[turn]})
                r = await c.chat.completions.create(**request(case, messages))
                usage = r.usage
                assert usage is not None and usage.prompt_tokens_details is not None
                cached = usage.prompt_tokens_details.cached_tokens or 0
                explained = (r.model_extra or {})["erllama"]["cache"]["explain"]
                where = f"{case}, turn {turn + 1}"
                if previous is not None:
                    if turn != RESTART_AFTER:
                        computed = previous.prompt_tokens + previous.completion_tokens
                        assert explained["matched"] >= computed, (where, computed, explained)

                    assert cached >= previous.prompt_tokens // GRID * GRID, (where, explained)
                message = r.choices[0].message
                if case != "tool call re-serialized":
                    prompt = await srv.engine.apply_chat_template("smol", messages)
                    assert len(prompt) == usage.prompt_tokens, where
                    grammar = request(case, messages)["extra_body"].get("grammar")
                    expected = await cold.reply(prompt, grammar)
                    assert message.content == expected, where
                messages.append(send_back(case, message))
                if case == "tool call re-serialized":
                    call = message.tool_calls[0]
                    messages.append(
                        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}
                    )
                previous = usage
    assert turn == TURNS - 1
