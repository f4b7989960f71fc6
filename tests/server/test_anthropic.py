"""The Anthropic-compatible routes, driven by the official ``anthropic`` package (async and
sync clients, streaming and not) against the real server on stub models.

anthropic 2.x's ``messages.create()`` takes no temperature/top_p/top_k; tests pass them in
``extra_body`` (they arrive as top-level fields, which the server reads)."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

import anthropic
import anyio
import pytest

from .conftest import ANTHROPIC_WEATHER_TOOL, KEY, SIGNING_KEY, Served, Server

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0.0, "top_k": 1}


def client(server: Served) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)


def user(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_a_message_with_system_and_sampling_fields(served: Served) -> None:
    # A question no request asked before: no live KV anywhere shares enough of it to be used.
    messages = user(f"{uuid.uuid4().hex} hello")
    async with client(served) as c:
        m = await c.messages.create(
            model="plain", max_tokens=32, system="Be brief.", messages=messages, extra_body=GREEDY
        )
        counted = await c.messages.count_tokens(
            model="plain", system="Be brief.", messages=messages
        )
    assert m.type == "message" and m.role == "assistant" and m.model == "plain"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == " kabo rite sanu mila tove"  # type: ignore[union-attr]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.output_tokens == 5  # the script's words (end-of-generation is not counted)
    assert m.usage.input_tokens == counted.input_tokens > 0
    assert m.usage.cache_read_input_tokens == 0
    assert (m.model_extra or {})["erllama"]["cache"]["hit_kind"] == "cold"


async def test_stop_sequences_and_max_tokens_give_their_stop_reasons(server: Server) -> None:
    async with client(server) as c:
        stopped = await c.messages.create(
            model="plain", max_tokens=32, messages=user(), stop_sequences=["sanu"]
        )
        cut = await c.messages.create(model="plain", max_tokens=2, messages=user())
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "sanu"
    assert stopped.content[0].text == " kabo rite "  # type: ignore[union-attr]
    assert cut.stop_reason == "max_tokens"


async def test_the_stream_helper_builds_the_same_message(server: Server) -> None:
    async with (
        client(server) as c,
        c.messages.stream(model="plain", max_tokens=32, messages=user()) as stream,
    ):
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == " kabo rite sanu mila tove"
    assert final.content[0].text == "".join(texts)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 5


async def test_the_raw_stream_sends_every_event_in_order(served: Served) -> None:
    async with client(served) as c:
        stream = await c.messages.create(model="plain", max_tokens=32, messages=user(), stream=True)
        kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start"
    assert kinds[1:3] == ["content_block_start", "content_block_delta"]
    assert kinds[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_a_tool_use_block_and_a_tool_result_round_trip(server: Server) -> None:
    async with client(server) as c:
        first = await c.messages.create(
            model="tools", max_tokens=200, messages=user("weather?"), tools=[ANTHROPIC_WEATHER_TOOL]
        )
        assert first.stop_reason == "tool_use"
        kinds = [b.type for b in first.content]
        assert kinds == ["text", "tool_use"]
        call = first.content[1]
        assert call.type == "tool_use"
        assert call.id.startswith("toolu_") and call.name == "get_weather"
        assert call.input == {"city": "Paris"}
        second = await c.messages.create(
            model="tools",
            max_tokens=200,
            tools=[ANTHROPIC_WEATHER_TOOL],
            messages=[
                *user("weather?"),
                {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21 C"}],
                },
            ],
        )
    # The replayed reply came back token for token: everything before it is reused.
    reused = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert (second.usage.cache_read_input_tokens or 0) >= reused + first.usage.output_tokens - 1


async def test_a_streamed_tool_use_block(served: Served) -> None:
    async with (
        client(served) as c,
        c.messages.stream(
            model="tools", max_tokens=200, messages=user("weather?"), tools=[ANTHROPIC_WEATHER_TOOL]
        ) as stream,
    ):
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and call.input == {"city": "Paris"}


async def test_tool_choice_any_with_a_tool_that_is_not_there_is_a_400(server: Server) -> None:
    async with client(server) as c:
        with pytest.raises(anthropic.BadRequestError) as exc:
            await c.messages.create(
                model="tools",
                max_tokens=20,
                messages=user(),
                tools=[ANTHROPIC_WEATHER_TOOL],
                tool_choice={"type": "tool", "name": "nope"},
            )
    assert "tool_choice.name" in exc.value.message


def _signature(text: str) -> str:
    return hmac.new(SIGNING_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


async def test_thinking_comes_back_as_a_signed_thinking_block(server: Server) -> None:
    async with client(server) as c:
        m = await c.messages.create(
            model="thinker", max_tokens=40, messages=user(),
            thinking={"type": "enabled", "budget_tokens": 16},
        )  # fmt: skip
    thinking, text = m.content
    assert thinking.type == "thinking" and thinking.thinking == " kabo rite "
    assert thinking.signature == _signature(" kabo rite ")
    assert text.type == "text" and text.text == " sanu mila"


async def test_streamed_thinking_has_its_deltas_and_signature(server: Server) -> None:
    async with (
        client(server) as c,
        c.messages.stream(
            model="thinker", max_tokens=40, messages=user(),
            thinking={"type": "enabled", "budget_tokens": 16},
        ) as stream,
    ):  # fmt: skip
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.signature == _signature(" kabo rite ")


async def test_without_thinking_the_span_is_text(server: Server) -> None:
    async with client(server) as c:
        m = await c.messages.create(model="thinker", max_tokens=40, messages=user())
    assert [b.type for b in m.content] == ["text"]


async def test_count_tokens_counts_the_rendered_prompt(server: Server) -> None:
    async with client(server) as c:
        short = await c.messages.count_tokens(model="plain", messages=user("hi"))
        longer = await c.messages.count_tokens(
            model="plain", system="Be brief.", messages=user("hi there, tell me more")
        )
        m = await c.messages.create(model="plain", max_tokens=4, messages=user("hi"))
    assert 0 < short.input_tokens < longer.input_tokens
    assert short.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


async def test_models_list_through_the_anthropic_client(server: Server) -> None:
    async with client(server) as c:
        page = await c.models.list()
    assert "plain" in {m.id for m in page.data}


async def test_the_sync_client_works_from_a_worker_thread(server: Server) -> None:
    url = server.url  # read on the loop; the client runs in a worker thread

    def run() -> tuple[str, str]:
        with anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0) as c:
            m = c.messages.create(model="plain", max_tokens=32, messages=user())
            with c.messages.stream(model="plain", max_tokens=32, messages=user()) as s:
                streamed = "".join(s.text_stream)
        return m.content[0].text, streamed  # type: ignore[union-attr]

    whole, streamed = await anyio.to_thread.run_sync(run)
    assert whole == streamed == " kabo rite sanu mila tove"


async def test_errors_come_in_the_anthropic_shape(server: Server) -> None:
    async with client(server) as c:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await c.messages.create(model="nope", max_tokens=4, messages=user())
        with pytest.raises(anthropic.BadRequestError) as bad:
            await c.messages.create(
                model="plain",
                max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "image"}]}],  # type: ignore[list-item]
            )
    assert missing.value.type == "not_found_error"  # type: ignore[attr-defined]
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages[0].content[0].type" in bad.value.message
