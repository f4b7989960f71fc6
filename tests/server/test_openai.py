"""The OpenAI-compatible routes, driven by the official ``openai`` package (async and sync
clients, streaming and not) against the real server on stub models."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from typing import Any

import anyio
import openai
import pytest

from .conftest import (
    CALL_JSON,
    KEY,
    TOOL_SCRIPT,
    WEATHER_TOOL,
    Served,
    Server,
    chat_body,
    own_model,
)

pytestmark = pytest.mark.anyio


def client(server: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def user(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": text}]


def fresh() -> str:
    """A question no other request asks (its first words differ from every other prompt's)."""
    return f"{uuid.uuid4().hex} hello"


# ---- models ----------------------------------------------------------------------------------


async def test_models_lists_every_loaded_model_and_retrieves_one(server: Server) -> None:
    async with client(server) as c:
        page = await c.models.list()
        assert {m.id for m in page.data} >= {"plain", "tools", "thinker", "free"}
        assert all(m.owned_by == "erllama" for m in page.data)
        one = await c.models.retrieve("plain")
        assert one.id == "plain"
        with pytest.raises(openai.NotFoundError):
            await c.models.retrieve("nope")


# ---- chat --------------------------------------------------------------------------------------


async def test_a_chat_completion_returns_the_reply_usage_and_cache_outcome(served: Served) -> None:
    # A question no request asked before: no live KV anywhere shares enough of it to be used.
    async with client(served) as c:
        r = await c.chat.completions.create(model="plain", messages=user(fresh()), max_tokens=32)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == " kabo rite sanu mila tove"
    assert choice.finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "plain"
    assert r.usage is not None
    assert r.usage.completion_tokens == 5  # the script's words (end-of-generation is not counted)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    ext = (r.model_extra or {})["erllama"]
    assert ext["cache"] == {"hit_kind": "cold", "tokens_restored": 0, "tokens_saved": 0}


async def test_the_same_chat_again_reads_its_prompt_from_the_live_kv(server: Server) -> None:
    """Local only: on Ray the second request may be routed to the other replica. An exact
    hit restores all of the prompt but its last token, fed again for its logits (a state
    carries none)."""
    messages = user(fresh())
    prompt = await server.engine.apply_chat_template("plain", messages)
    async with client(server) as c:
        first = await c.chat.completions.create(model="plain", messages=messages, max_tokens=32)
        again = await c.chat.completions.create(model="plain", messages=messages, max_tokens=32)
    assert again.choices[0].message.content == first.choices[0].message.content
    for r, cached, kind in ((first, 0, "cold"), (again, len(prompt) - 1, "exact")):
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        assert r.usage.prompt_tokens_details is not None
        assert r.usage.prompt_tokens_details.cached_tokens == cached
        cache = (r.model_extra or {})["erllama"]["cache"]
        assert (cache["hit_kind"], cache["tokens_restored"]) == (kind, cached)


async def test_max_tokens_ends_the_reply_with_finish_reason_length(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(model="plain", messages=user(), max_completion_tokens=2)
    assert r.choices[0].message.content == " kabo rite"
    assert r.choices[0].finish_reason == "length"


async def test_a_stop_string_ends_the_reply_and_is_not_returned(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(
            model="plain", messages=user(), max_tokens=32, stop=["sanu"]
        )
    assert r.choices[0].message.content == " kabo rite "
    assert r.choices[0].finish_reason == "stop"
    assert (r.model_extra or {})["erllama"]["stop_sequence"] == "sanu"


async def test_a_streamed_chat_completion_with_usage(served: Served) -> None:
    async with client(served) as c:
        stream = await c.chat.completions.create(
            model="plain",
            messages=user(),
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == " kabo rite sanu mila tove"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens >= 5


async def test_the_sync_client_works_from_a_worker_thread(server: Server) -> None:
    url = server.url  # read on the loop; the client runs in a worker thread

    def run() -> tuple[str, str]:
        with sync_client(url) as c:
            r = c.chat.completions.create(model="plain", messages=user(), max_tokens=32)
            stream = c.chat.completions.create(
                model="plain", messages=user(), max_tokens=32, stream=True
            )
            streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        return r.choices[0].message.content or "", streamed

    whole, streamed = await anyio.to_thread.run_sync(run)
    assert whole == streamed == " kabo rite sanu mila tove"


# ---- tool calls --------------------------------------------------------------------------------


async def test_a_tool_call_comes_back_with_a_minted_id_and_its_arguments(served: Served) -> None:
    async with client(served) as c:
        r = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and len(call.id) > 20
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "Let me check. "


async def test_a_streamed_tool_calls_arguments_arrive_as_the_model_writes_them(
    served: Served,
) -> None:
    async with client(served) as c:
        stream = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200,
            stream=True,
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        whole = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        )
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    # The first delta names the call; the arguments follow in pieces, all at index 0.
    assert first.index == 0 and first.id and first.id.startswith("call_")
    assert first.function is not None and first.function.name == "get_weather"
    assert first.function.arguments == "" and len(rest) > 1
    assert all(d.index == 0 and d.id is None and d.function is not None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in rest if d.function is not None)
    # Exactly the bytes of the arguments object in the model's text (CALL_JSON's), which is
    # what the call carries unstreamed too.
    assert arguments == '{"city":"Paris"}' and arguments in CALL_JSON
    (call,) = whole.choices[0].message.tool_calls or []
    assert call.function.arguments == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_stream_helper_accumulates_the_tool_call(server: Server) -> None:
    async with (
        client(server) as c,
        c.chat.completions.stream(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        ) as stream,
    ):
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_without_tools_a_call_the_model_writes_is_plain_text(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(model="tools", messages=user(), max_tokens=200)
    message = r.choices[0].message
    assert not message.tool_calls and r.choices[0].finish_reason == "stop"
    assert CALL_JSON in (message.content or "")


async def test_tool_choice_none_returns_the_call_as_text(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(
            model="tools", messages=user(), tools=[WEATHER_TOOL], tool_choice="none",
            max_tokens=200,
        )  # fmt: skip
    assert not r.choices[0].message.tool_calls
    assert CALL_JSON in (r.choices[0].message.content or "")


async def replay_turn(
    c: openai.AsyncOpenAI, first: Any, call_id: str | None = None
) -> tuple[int, Any]:
    """Send the first turn back with its tool call answered; returns the cached tokens."""
    call = first.choices[0].message.tool_calls[0]
    assistant = {
        "role": "assistant",
        "content": first.choices[0].message.content,
        "tool_calls": [
            {
                "id": call_id or call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
    r = await c.chat.completions.create(
        model="tools",
        messages=[
            *user("weather?"),
            assistant,
            {"role": "tool", "tool_call_id": call_id or call.id, "content": '{"temp_c": 21}'},
        ],
        tools=[WEATHER_TOOL],
        max_tokens=200,
    )
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    return r.usage.prompt_tokens_details.cached_tokens or 0, r


async def test_a_replayed_tool_call_renders_the_exact_reply_so_the_prefix_stays_cached(
    server: Server,
) -> None:
    async with client(server) as c:
        first = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        )
        assert first.usage is not None
        reused = first.usage.prompt_tokens + first.usage.completion_tokens
        cached, _ = await replay_turn(c, first)
        # Everything the model had in its KV is reused: the prompt, its reply, and the
        # end-of-turn token it sampled last (not counted in completion_tokens; the replayed
        # history renders it too). The history came back token for token.
        assert cached == reused + 1
        # An id the server never minted is rendered from the structured call instead: the
        # reuse stops where the assistant's reply begins.
        first = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        )
        assert first.usage is not None
        cached, _ = await replay_turn(c, first, call_id="call_unknown")
        assert cached == first.usage.prompt_tokens


async def test_the_tool_call_store_forgets_least_recently_used_ids(server: Server) -> None:
    store = server.state.store
    async with client(server) as c:
        r = await c.chat.completions.create(
            model="tools", messages=user("weather?"), tools=[WEATHER_TOOL], max_tokens=200
        )
    call_id = (r.choices[0].message.tool_calls or [])[0].id
    # The exact text the model generated, which a replayed turn renders token for token.
    assert store.reply_for("tools", [call_id]) == TOOL_SCRIPT
    assert store.reply_for("plain", [call_id]) is None  # ids belong to their model


# ---- legacy completions and embeddings -------------------------------------------------------


async def test_completions_stream_and_not(server: Server) -> None:
    async with client(server) as c:
        r = await c.completions.create(model="plain", prompt="Once upon", max_tokens=3)
        assert r.choices[0].text == " kabo rite sanu"
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 3
        stream = await c.completions.create(
            model="plain", prompt=[5, 6, 7], max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == " kabo rite sanu"
    assert chunks[-1].usage is not None


async def test_completions_default_to_16_tokens(server: Server) -> None:
    async with client(server) as c:
        r = await c.completions.create(model="free", prompt="go")
    assert r.usage is not None and r.usage.completion_tokens == 16


def floats(value: list[float] | str) -> list[float]:
    """A vector, decoded when it came as base64 (little-endian float32, as OpenAI sends)."""
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return value


# With no encoding_format the SDK asks for base64 and decodes it itself.
@pytest.mark.parametrize("fmt", ["float", "base64", None])
async def test_embeddings_in_floats_and_base64(server: Server, fmt: str | None) -> None:
    kw: dict[str, Any] = {} if fmt is None else {"encoding_format": fmt}
    async with client(server) as c:
        r = await c.embeddings.create(model="plain", input=["kabo rite", "sanu"], **kw)
        again = await c.embeddings.create(model="plain", input="sanu", encoding_format="float")
    assert [d.index for d in r.data] == [0, 1]
    vectors = [floats(d.embedding) for d in r.data]
    assert len(vectors[0]) == 32
    assert vectors[1] == pytest.approx(again.data[0].embedding, rel=1e-6)
    assert r.usage.prompt_tokens > 0


# ---- erllama's own fields ----------------------------------------------------------------------


async def test_session_id_and_parent_key_pass_through_the_erllama_field(server: Server) -> None:
    async with own_model(server, script="kabo rite") as (mid, _):
        async with client(server) as c:
            r = await c.chat.completions.create(
                model=mid, messages=user(), max_tokens=8,
                extra_body={"erllama": {"session_id": "s-1"}},
            )  # fmt: skip
            ext = (r.model_extra or {})["erllama"]
            info = server.engine.model_info(mid)
            assert [s.id for s in info.sessions] == ["s-1"]
        async with server.http() as h:
            bad = await h.post(
                "/v1/chat/completions", json=chat_body(mid, erllama={"parent_key": "zz"})
            )
    assert ext["seed"] >= 0 and "finish_key" in ext
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "erllama.parent_key"


async def test_a_request_without_max_tokens_gets_the_servers_cap(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(model="free", messages=user())
    assert r.usage is not None
    assert r.usage.completion_tokens == server.state.config.server.max_tokens
    assert r.choices[0].finish_reason == "length"


async def test_a_call_cut_off_by_max_tokens_comes_back_as_text(server: Server) -> None:
    async with client(server) as c:
        r = await c.chat.completions.create(
            model="tools", messages=user(), tools=[WEATHER_TOOL], max_tokens=40
        )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert (choice.message.content or "").startswith('Let me check. <tool_call> {"name"')
