"""OpenAI's Responses API, driven by the official ``openai`` package (``responses.create``,
``responses.stream``, retrieve, delete, input items) and by the openai-agents SDK's default
Responses model, against the real server on stub models."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import anyio
import attrs
import openai
import pytest

import erllama
from erllama.plugins import BackendRegistry
from erllama.server import ServeConfig

from .conftest import (
    KEY,
    PLAIN_SCRIPT,
    Served,
    Server,
    own_model,
    running_server,
    serve_config,
)

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": False,
}
#: Long enough that its prefix is worth keeping in a model's live KV (the cache policy's
#: min_tokens), so reuse shows on a server without a cache.
LONG = "what is the weather in paris today? " * 4


def client(server: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def cached(r: Any) -> int:
    return int(r.usage.input_tokens_details.cached_tokens)


# ---- create ------------------------------------------------------------------------------------


async def test_a_text_input_gets_a_message_and_usage(served: Served) -> None:
    async with client(served) as c:
        r = await c.responses.create(model="plain", input="hello")
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == " " + PLAIN_SCRIPT
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.usage is not None and r.usage.output_tokens >= 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert (r.model_extra or {})["erllama"]["cache"]["hit_kind"] in ("exact", "partial", "cold")


async def test_instructions_and_items_are_the_rendered_prompt(server: Server) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "kabo"},
        {"role": "assistant", "content": "rite"},
        {"role": "system", "content": "Mind the rules."},
        {"role": "user", "content": "sanu"},
    ]
    rendered = await server.engine.apply_chat_template("plain", messages)
    async with client(server) as c:
        r = await c.responses.create(
            model="plain",
            instructions="Be brief.",
            input=[
                {"role": "user", "content": "kabo"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "rite"}]},
                {"role": "developer", "content": "Mind the rules."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "sanu"}]},
            ],
        )  # fmt: skip
    assert r.usage is not None and r.usage.input_tokens == len(rendered)
    assert r.instructions == "Be brief."


async def test_max_output_tokens_makes_an_incomplete_response(server: Server) -> None:
    async with client(server) as c:
        r = await c.responses.create(model="plain", input="hello", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.output_tokens == 2


async def test_sampling_fields_are_echoed_and_applied(server: Server) -> None:
    async with client(server) as c:
        a = await c.responses.create(model="free", input="x", max_output_tokens=6, temperature=0.9, top_p=0.5, extra_body={"seed": 5})  # fmt: skip
        b = await c.responses.create(model="free", input="x", max_output_tokens=6, temperature=0.9, top_p=0.5, extra_body={"seed": 5})  # fmt: skip
        g = await c.responses.create(model="free", input="x", max_output_tokens=6, temperature=0)
    assert a.temperature == 0.9 and a.top_p == 0.5 and a.max_output_tokens == 6
    assert a.output_text == b.output_text != g.output_text


# ---- streaming ---------------------------------------------------------------------------------


async def test_the_raw_stream_sends_the_documented_events_in_order(served: Served) -> None:
    async with client(served) as c:
        stream = await c.responses.create(model="plain", input="hello", stream=True)
        events = [e async for e in stream]
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 5
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == " " + PLAIN_SCRIPT and done.usage is not None
    assert events[0].response.status == "in_progress"  # type: ignore[union-attr]


async def test_the_stream_helper_builds_the_final_response(server: Server) -> None:
    async with (
        client(server) as c,
        c.responses.stream(model="plain", input="hello") as stream,
    ):
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == final.output_text == " " + PLAIN_SCRIPT


async def test_a_streamed_function_call_and_reasoning(server: Server) -> None:
    async with client(server) as c:
        stream = await c.responses.create(
            model="tools", input="weather?", tools=[WEATHER], stream=True
        )  # type: ignore[list-item]
        kinds = [e.type async for e in stream]
        thinking = await c.responses.create(model="thinker", input="hello", stream=True)
        think_events = [e async for e in thinking]
    call_part = kinds[kinds.index("response.output_item.done") + 1 :]
    assert call_part == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    reasoning = [e.delta for e in think_events if e.type == "response.reasoning_text.delta"]
    assert "".join(reasoning) == " kabo rite "
    final = think_events[-1].response  # type: ignore[union-attr]
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == " kabo rite "
    assert final.output_text == " sanu mila"


# ---- tools -------------------------------------------------------------------------------------


async def test_a_function_call_round_trip_replays_the_exact_reply(server: Server) -> None:
    async with client(server) as c:
        first = await c.responses.create(model="tools", input=LONG, tools=[WEATHER])  # type: ignore[list-item]
        calls = [i for i in first.output if i.type == "function_call"]
        assert [(x.name, json.loads(x.arguments)) for x in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert first.output[0].type == "message"
        # The agent loop: everything back, plus the tool's output (items as the SDK has them).
        history = [
            {"role": "user", "content": LONG},
            *[i.model_dump(exclude_none=True) for i in first.output],
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"},
        ]
        second = await c.responses.create(model="tools", input=history, tools=[WEATHER])  # type: ignore[list-item, arg-type]
    assert first.usage is not None
    reused = first.usage.input_tokens + first.usage.output_tokens
    assert cached(second) >= reused - 1


async def test_tool_choice_none_gives_the_call_as_text(server: Server) -> None:
    async with client(server) as c:
        r = await c.responses.create(model="tools", input="x", tools=[WEATHER], tool_choice="none")  # type: ignore[list-item]
    assert [i.type for i in r.output] == ["message"]
    assert "<tool_call>" in r.output_text


# ---- previous_response_id ------------------------------------------------------------------------


async def test_a_chained_turn_restores_the_whole_previous_context(served: Served) -> None:
    async with client(served) as c:
        first = await c.responses.create(model="plain", input=LONG, instructions="Be brief.")
        second = await c.responses.create(
            model="plain", input="sanu", previous_response_id=first.id
        )
        third = await c.responses.create(
            model="plain", input="mila", previous_response_id=second.id
        )
    for before, after in ((first, second), (second, third)):
        assert before.usage is not None and after.usage is not None
        context = before.usage.input_tokens + before.usage.output_tokens
        # Every token of the previous request (prompt, reply, end of generation) is
        # restored, never re-rendered: the new prompt starts with all of them.
        assert cached(after) in (context, context + 1)
        assert after.usage.input_tokens > context
    assert second.previous_response_id == first.id


async def test_a_chained_prompt_is_the_previous_context_and_the_new_turn(server: Server) -> None:
    async with client(server) as c:
        first = await c.responses.create(model="plain", input=LONG)
        second = await c.responses.create(
            model="plain", input="sanu", previous_response_id=first.id
        )
    stored = [await server.state.responses.get(r.id) for r in (first, second)]
    assert stored[0] is not None and stored[1] is not None
    context = list(stored[0].context)
    # The stub's template closes a turn with its end-of-generation token, which the first
    # context ends with: the new turn follows it directly, as the template renders it.
    frame = await server.engine.apply_chat_template(
        "plain", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], add_generation_prompt=False
    )  # fmt: skip
    extended = await server.engine.apply_chat_template(
        "plain",
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "sanu"}],
    )  # fmt: skip
    new_turn = extended[len(frame) :]
    assert list(stored[1].context[: len(context) + len(new_turn)]) == context + new_turn


async def test_chaining_with_other_instructions_renders_the_whole_conversation(
    server: Server,
) -> None:
    async with client(server) as c:
        first = await c.responses.create(model="plain", input="kabo", instructions="Be brief.")
        second = await c.responses.create(
            model="plain", input="sanu", previous_response_id=first.id, instructions="Be long."
        )
    reference = await server.engine.apply_chat_template(
        "plain",
        [
            {"role": "system", "content": "Be long."},
            {"role": "user", "content": "kabo"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "sanu"},
        ],
    )
    assert second.usage is not None and second.usage.input_tokens == len(reference)


async def test_chaining_onto_another_model_renders_the_whole_conversation(
    server: Server,
) -> None:
    """Another vocabulary (another fingerprint): the previous tokens mean nothing there."""
    async with own_model(server, script="kabo", n_vocab=30_000) as (mid, _), client(server) as c:
        first = await c.responses.create(model="plain", input="kabo")
        second = await c.responses.create(model=mid, input="sanu", previous_response_id=first.id)
        reference = await server.engine.apply_chat_template(
            mid,
            [
                {"role": "user", "content": "kabo"},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "sanu"},
            ],
        )
    assert second.usage is not None and second.usage.input_tokens == len(reference)


async def test_an_unknown_previous_response_is_a_400(served: Served) -> None:
    async with client(served) as c:
        with pytest.raises(openai.BadRequestError) as err:
            await c.responses.create(model="plain", input="x", previous_response_id="resp_nope")
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


# ---- stored responses ----------------------------------------------------------------------------


async def test_retrieve_input_items_and_delete(served: Served) -> None:
    async with client(served) as c:
        r = await c.responses.create(model="plain", input=[{"role": "user", "content": "kabo"}, {"role": "user", "content": "rite"}])  # fmt: skip
        got = await c.responses.retrieve(r.id)
        items = await c.responses.input_items.list(r.id, order="asc")
        await c.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.delete(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == "completed"
    texts = [i.content[0].text for i in items.data]  # type: ignore[union-attr]
    assert texts == ["kabo", "rite"]


async def test_store_false_keeps_nothing(server: Server) -> None:
    async with client(server) as c:
        r = await c.responses.create(model="plain", input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError):
            await c.responses.create(model="plain", input="y", previous_response_id=r.id)


@pytest.fixture
def persistent(tmp_path: Path) -> tuple[Path, Any]:
    """A server whose cache has a disk tier under ``tmp_path`` (stored responses persist
    there), and a factory for another one over the same directory (a restart)."""

    def config(**server: Any) -> ServeConfig:
        base = serve_config(**{"stored_responses": 16, **server})
        cache = erllama.CacheConfig(ram_file_dir=None, disk_dir=tmp_path / "cache")
        return attrs.evolve(base, cache=cache)

    return tmp_path / "cache" / "responses", config


async def test_stored_responses_survive_a_restart_and_chain_warm(
    persistent: tuple[Path, Any], stub_registry: BackendRegistry
) -> None:
    directory, config = persistent
    async with running_server(config(), stub_registry) as srv, client(srv) as c:
        first = await c.responses.create(model="plain", input=LONG)
    assert (directory / f"{first.id}.json").is_file()
    assert directory.stat().st_mode & 0o777 == 0o700
    async with running_server(config(), stub_registry) as srv, client(srv) as c:
        again = await c.responses.retrieve(first.id)
        second = await c.responses.create(
            model="plain", input="sanu", previous_response_id=first.id
        )
    assert again.output_text == first.output_text
    assert first.usage is not None and second.usage is not None
    context = first.usage.input_tokens + first.usage.output_tokens
    # After the restart the previous context comes back from the disk tier, whole.
    assert cached(second) in (context, context + 1)


async def test_a_damaged_stored_response_is_a_miss_and_removed(
    persistent: tuple[Path, Any], stub_registry: BackendRegistry
) -> None:
    directory, config = persistent
    async with running_server(config(), stub_registry) as srv, client(srv) as c:
        first = await c.responses.create(model="plain", input="kabo")
        second = await c.responses.create(model="plain", input="rite")
    path = directory / f"{first.id}.json"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the body
    path.write_bytes(bytes(raw))
    (directory / f"{second.id}.json").unlink()
    os.symlink("/etc/passwd", directory / f"{second.id}.json")
    async with running_server(config(), stub_registry) as srv, client(srv) as c:
        for r in (first, second):
            with pytest.raises(openai.NotFoundError):
                await c.responses.retrieve(r.id)
    assert not path.exists() and not (directory / f"{second.id}.json").is_symlink()


async def test_the_store_keeps_the_most_recent_and_drops_their_files(
    persistent: tuple[Path, Any], stub_registry: BackendRegistry
) -> None:
    directory, config = persistent
    async with running_server(config(stored_responses=2), stub_registry) as srv, client(srv) as c:
        ids = [(await c.responses.create(model="plain", input=w)).id for w in ("kabo", "rite")]
        await c.responses.retrieve(ids[0])  # used: now the most recent
        ids.append((await c.responses.create(model="plain", input="sanu")).id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(ids[1])
        assert (await c.responses.retrieve(ids[0])).id == ids[0]
    assert sorted(p.stem for p in directory.glob("*.json")) == sorted([ids[0], ids[2]])


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"type": "input_image"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice.name"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"truncation": "middle"}, "truncation"),
        ({"metadata": {"k": 5}}, "metadata.k"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"reasoning": {"effort": 3}}, "reasoning.effort"),
    ],
)  # fmt: skip
async def test_a_bad_parameter_is_a_400_naming_it(
    served: Served, change: dict[str, Any], param: str
) -> None:
    async with served.http() as h:
        r = await h.post("/v1/responses", json={"model": "plain", "input": "x", **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_a_number_json_cannot_carry_is_a_400_naming_where(server: Server) -> None:
    raw = '{"model": "plain", "input": "x", "metadata": {"k": "v"}, "text": {"format": {"type": "json_schema", "schema": {"minimum": NaN}}}}'
    async with server.http() as h:
        r = await h.post("/v1/responses", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.schema.minimum"


async def test_metadata_is_echoed_and_kept(server: Server) -> None:
    async with client(server) as c:
        r = await c.responses.create(model="plain", input="x", metadata={"run": "7"})
        got = await c.responses.retrieve(r.id)
    assert r.metadata == got.metadata == {"run": "7"}


async def test_unknown_models_and_ids_are_404s_in_openais_shape(served: Served) -> None:
    async with served.http() as h:
        a = await h.post("/v1/responses", json={"model": "nope", "input": "x"})
        b = await h.get("/v1/responses/resp_" + "0" * 48)
        c = await h.get("/v1/responses/../../etc/passwd")
        d = await h.delete("/v1/responses/not-an-id")
    assert a.status_code == 404 and a.json()["error"]["code"] == "model_not_found"
    assert b.status_code == 404 and b.json()["error"]["code"] == "response_not_found"
    assert c.status_code == 404 and d.status_code == 404


async def test_a_failure_mid_stream_raises_in_the_client(server: Server) -> None:
    async with own_model(server, fail_at="step", fail_step=3) as (mid, _), client(server) as c:
        stream = await c.responses.create(model=mid, input="x", stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


# ---- the openai-agents SDK -----------------------------------------------------------------------


def run_agent(
    url: str,
    model: str,
    settings: dict[str, Any],
    prompt: str,
    *,
    streamed: bool = False,
    chained: bool = False,
) -> Any:
    """One agent run with the SDK's default (Responses) model, in a worker thread with an
    asyncio loop of its own (the SDK is asyncio-only; the server runs on the test's loop).
    The weather tool records its calls; the run ends after the model has seen the tool's
    output once (or answered in text). ``chained``: the SDK sends only new items, with
    ``previous_response_id``, instead of the whole history."""
    from agents import (
        Agent,
        FunctionToolResult,
        ModelSettings,
        OpenAIResponsesModel,
        RunContextWrapper,
        Runner,
        ToolsToFinalOutputResult,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city.

        Args:
            city: The city.
        """
        calls.append(city)
        return f"21 C in {city}"

    def second_tool_run(
        ctx: RunContextWrapper[Any], results: list[FunctionToolResult]
    ) -> ToolsToFinalOutputResult:
        return ToolsToFinalOutputResult(
            is_final_output=len(calls) >= 2, final_output=results[-1].output
        )

    async def main() -> Any:
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        agent = Agent(
            name="weather",
            instructions="Answer with the weather tool.",
            model=OpenAIResponsesModel(model=model, openai_client=oai),
            model_settings=ModelSettings(**settings),
            tools=[get_weather],
            tool_use_behavior=second_tool_run,
        )
        if streamed:
            result: Any = Runner.run_streamed(
                agent, prompt, max_turns=4, auto_previous_response_id=chained
            )
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, prompt, max_turns=4, auto_previous_response_id=chained)
        await oai.close()
        return result, calls

    return asyncio.run(main())


async def test_the_agents_sdk_runs_a_tool_round_trip_on_auto(server: Server) -> None:
    url = server.url
    result, calls = await anyio.to_thread.run_sync(
        lambda: run_agent(url, "tools", {"tool_choice": "auto"}, LONG)
    )
    assert calls == ["Paris", "Paris"]  # the scripted model calls on every turn
    first, second = result.raw_responses
    # The second request carried the tool's output after the first reply, replayed
    # exactly: all of the first turn was reused.
    assert second.usage.input_tokens_details.cached_tokens >= (
        first.usage.input_tokens + first.usage.output_tokens - 1
    )
    async with client(server) as c:
        items = await c.responses.input_items.list(second.response_id, order="asc")
    outputs = [i for i in items.data if i.type == "function_call_output"]
    assert [o.output for o in outputs] == ["21 C in Paris"]  # type: ignore[union-attr]
    assert result.final_output == "21 C in Paris"


async def test_the_agents_sdk_streams_and_chains_with_previous_response_id(
    server: Server,
) -> None:
    url = server.url
    result, calls = await anyio.to_thread.run_sync(
        lambda: run_agent(url, "tools", {}, LONG, streamed=True, chained=True)
    )
    assert calls == ["Paris", "Paris"] and result.final_output == "21 C in Paris"
    first, second = result.raw_responses
    stored = await server.state.responses.get(second.response_id)
    assert stored is not None
    assert stored.response["previous_response_id"] == first.response_id
    # Only the tool's output was sent; the first exchange came back whole from its tokens.
    assert [i["type"] for i in stored.input_items] == ["function_call_output"]
    context = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens in (context, context + 1)
