"""Generation features on SmolLM2: stop strings, a thinking budget, a tool call and its exact
replay, sessions, prefill_only and constrained JSON. Every output is checked against a run
that shares nothing with it (a fresh engine, the cache off)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import erllama

from ..helpers import cold_run
from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio

QUESTION = [{"role": "user", "content": "Write two sentences about the sea."}]
#: A prefill grid small enough that these short prompts have whole cells to reuse.
GRID = 8
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
# Forces the call's shape; the model chooses the city.
TOOL_GRAMMAR = r"""
root ::= "<tool_call>" "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" city "\"}}" "</tool_call>"
city ::= [A-Z] [a-z]{2,10}
"""


@pytest.fixture
def cache_on(tmp_path: Path) -> erllama.EngineConfig:
    policy = erllama.CachePolicy(min_tokens=8, cold_min_tokens=30_000)
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=None, policy=policy)
    )


@pytest.fixture
async def warm(cache_on: erllama.EngineConfig) -> AsyncIterator[erllama.Engine]:
    async with erllama.open_engine(cache_on) as engine:
        yield engine


async def cold(config: erllama.ModelConfig, prompt: list[int], **kw: Any) -> erllama.Completion:
    """The same request on a fresh engine with the cache off: shares no KV with anything."""
    return await cold_run(None, prompt, model=config, **kw)


async def test_a_stop_string_trims_the_reply_and_the_row_holds_the_prompts_whole_cells(
    warm: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(smol_config, prefill_chunk=GRID, options=GRID_FEEDING)
    mid = await warm.load_model("smol", config)
    prompt = await warm.apply_chat_template(mid, QUESTION)
    full = await cold(config, prompt, max_tokens=40)
    # A stop string from the middle of the greedy reply, spanning a token boundary.
    cut = len(full.text) // 2
    stop = full.text[cut : cut + 4]
    assert stop.strip() and full.text.find(stop) == cut
    r = await warm.complete(mid, prompt, max_tokens=40, stop=[stop])
    assert r.finish_reason == "stop" and r.stop_sequence == stop
    assert r.text == full.text[:cut]
    assert full.token_ids[: len(r.token_ids)] == r.token_ids
    assert r.context_tokens == (*prompt, *r.token_ids)
    # The finish row holds the prompt's whole grid cells (generated tokens' cells are never
    # reused): resending the context restores them and answers as a cold run.
    again = await warm.complete(mid, list(r.context_tokens), max_tokens=6)
    assert again.cache_delta.read == len(prompt) // GRID * GRID
    assert again.token_ids == (await cold(config, list(r.context_tokens), max_tokens=6)).token_ids


async def test_the_thinking_budget_closes_the_span_and_the_model_answers(
    warm: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(
        smol_config, thinking_markers=erllama.ThinkingMarkers(start="<think>", end="</think>")
    )
    mid = await warm.load_model("smol", config)
    prompt = await warm.apply_chat_template(mid, QUESTION)
    start = await warm.tokenize(mid, "<think>", add_special=False, parse_special=True)
    end = await warm.tokenize(mid, "</think>", add_special=False, parse_special=True)
    # The prompt opens the span, as thinking models' templates do.
    stream = await warm.infer(
        mid, [*prompt, *start], thinking=True, thinking_budget_tokens=6, max_tokens=20
    )
    events = [ev async for ev in stream]
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("ThinkingEnd") == 1
    closed = kinds.index("ThinkingEnd")
    assert "Token" not in kinds[:closed] and "Token" in kinds[closed:]
    done = events[-1]
    assert isinstance(done, erllama.Done)
    # Six thinking tokens, then the end marker fed by the engine, then the answer.
    thinking_ids = done.token_ids[:6]
    body = len(prompt) + len(start)
    assert done.context[body : body + 6] == thinking_ids
    assert done.context[body + 6 : body + 6 + len(end)] == tuple(end)
    # The answer equals what the model says after that exact context, run cold.
    after = await cold(
        config, list(done.context[: body + 6 + len(end)]), max_tokens=len(done.token_ids) - 6
    )
    assert after.token_ids == done.token_ids[6:]


async def test_a_replayed_tool_call_keeps_the_turn_warm_and_answers_as_a_cold_run(
    warm: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(
        smol_config,
        prefill_chunk=GRID,
        options=GRID_FEEDING,
        tool_call_markers=erllama.ToolCallMarkers(start="<tool_call>", end="</tool_call>"),
    )
    mid = await warm.load_model("smol", config)
    user = {"role": "user", "content": "What is the weather in Paris?"}
    first = await (
        await warm.chat(mid, [user], tools=TOOLS, grammar=TOOL_GRAMMAR, max_tokens=60)
    ).collect()
    assert len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.startswith("<tool_call>") and call.endswith("</tool_call>")
    payload = json.loads(call.removeprefix("<tool_call>").removesuffix("</tool_call>"))
    assert payload["name"] == "get_weather"
    # Next turn: the assistant's message replays the call's exact bytes.
    history = [
        user,
        {"role": "assistant", "content": call},
        {"role": "user", "content": 'Tool result: {"temp_c": 18}. Answer briefly.'},
    ]
    second_prompt = await warm.apply_chat_template(mid, history, tools=TOOLS)
    first_prompt = len(first.context_tokens) - len(first.token_ids)
    call_tokens = len(first.token_ids) - (1 if first.finish_reason == "stop" else 0)
    # The replayed prompt holds the first turn's tokens through the end of the call ...
    end_of_call = first_prompt + call_tokens
    assert second_prompt[:end_of_call] == list(first.context_tokens[:end_of_call])
    # ... of which the cache restores the first prompt's whole grid cells (the call's own
    # cells came from one-token decodes: a cold prefill computes them otherwise) ...
    second = await warm.complete(mid, second_prompt, max_tokens=8)
    assert second.stats.cache_delta.read == first_prompt // GRID * GRID
    # ... and the answer is the cold run's of the same prompt.
    assert second.token_ids == (await cold(config, second_prompt, max_tokens=8)).token_ids


async def test_a_session_refeeds_from_its_prompts_last_whole_cell_and_answers_as_a_cold_run(
    warm: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(smol_config, n_seq_max=2, prefill_chunk=GRID, options=GRID_FEEDING)
    mid = await warm.load_model("smol", config)
    turn1 = await warm.apply_chat_template(mid, QUESTION)
    r1 = await warm.complete(mid, turn1, max_tokens=16, session_id="s")
    history = [*QUESTION, {"role": "assistant", "content": r1.text}]
    history.append({"role": "user", "content": "Now one about mountains."})
    turn2 = await warm.apply_chat_template(mid, history)
    r2 = await warm.complete(mid, turn2, max_tokens=16, session_id="s")
    assert warm.model_info(mid).last_cache_hit.source == "session"  # type: ignore[union-attr]
    assert r2.stats.cache_delta.read == len(turn1) // GRID * GRID
    assert r2.token_ids == (await cold(config, turn2, max_tokens=16)).token_ids


async def test_prefill_only_warms_a_prefix_that_a_later_request_restores(
    warm: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(smol_config, keep_live_kv=False, prefill_chunk=GRID, options=GRID_FEEDING)
    mid = await warm.load_model("smol", config)
    system = "You are a careful assistant who answers in one short sentence. " * 3
    prefix = await warm.apply_chat_template(mid, [], system=system, add_generation_prompt=False)
    key = await warm.prefill_only(mid, prefix)
    assert key is not None
    # The row holds the prefix's whole grid cells.
    assert warm.cache_row(key).tokens == tuple(prefix[: len(prefix) // GRID * GRID])  # type: ignore[union-attr]
    full = await warm.apply_chat_template(mid, QUESTION, system=system)
    assert full[: len(prefix)] == prefix
    r = await warm.complete(mid, full, max_tokens=12)
    assert r.cache_hit_kind == "partial"
    assert r.stats.cache_delta.read == len(prefix) // GRID * GRID
    assert r.token_ids == (await cold(config, full, max_tokens=12)).token_ids


async def test_response_format_constrains_the_reply_to_the_schema(
    llama_engine: erllama.Engine, smol: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    r = await (
        await llama_engine.chat(
            smol,
            messages,
            response_format={"type": "json_schema", "json_schema": {"schema": schema}},
            max_tokens=60,
        )
    ).collect()
    value = json.loads(r.text)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    with pytest.raises(erllama.InvalidRequest) as exc:
        await llama_engine.chat(smol, messages, response_format={"type": "xml"})
    assert exc.value.param == "response_format.type"
