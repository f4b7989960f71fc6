"""Errors: each API's own body and status, the parameter named, and never a 500 for bad
input. Raw HTTP (httpx) so every byte of the error is checked."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama.plugins import BackendRegistry

from ..helpers import examples, gated, wait_for
from .conftest import (
    ADMIN_KEY,
    JSON_TYPE,
    KEY,
    Served,
    Server,
    chat_body,
    messages_body,
    own_model,
    running_server,
    serve_config,
)

pytestmark = pytest.mark.anyio


def openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"]
    return dict(error)


def anthropic_error(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return dict(body["error"])


# ---- 400: bad parameters, named ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "maxItems": 10**9}}}}, "response_format"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias[1]"),
        ({"logit_bias": ["1"]}, "logit_bias"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_last_n": -5}, "repeat_last_n"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"grammar": ""}, "grammar"),
        ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "grammar"),
        ({"json_schema": "object"}, "json_schema"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"erllama": {"session_id": 5}}, "erllama.session_id"),
        ({"erllama": {"colour": "red"}}, "erllama.colour"),
        ({"model": 7}, "model"),
    ],
)  # fmt: skip
async def test_a_bad_chat_parameter_is_a_400_naming_it(
    served: Served, change: dict[str, Any], param: str
) -> None:
    async with served.http() as h:
        r = await h.post("/v1/chat/completions", json={**chat_body(), **change})
    error = openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b"\xff\xfe", "body"),
        (b"[" * 100_000, "body"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_a_400(
    server: Server, body: bytes, param: str
) -> None:
    async with server.http() as h:
        r = await h.post("/v1/chat/completions", content=body[:60_000], headers=JSON_TYPE)
    openai_error(r, 400, param)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages[0].content[0].type"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"stop_sequences": [3]}, "stop_sequences[0]"),
        ({"tool_choice": {"type": "any"}}, "tool_choice.type"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "prefill"),
    ],
)  # fmt: skip
async def test_a_bad_messages_parameter_is_an_anthropic_400(
    served: Served, change: dict[str, Any], fragment: str
) -> None:
    body = {k: v for k, v in {**messages_body(), **change}.items() if v is not None}
    async with served.http() as h:
        r = await h.post("/v1/messages", json=body)
    error = anthropic_error(r, 400, "invalid_request_error")
    assert fragment in error["message"]


# ---- 404 -------------------------------------------------------------------------------------


async def test_an_unknown_model_is_a_404_in_each_shape(served: Served) -> None:
    async with served.http() as h:
        a = await h.post("/v1/chat/completions", json=chat_body("nope"))
        b = await h.post("/v1/messages", json=messages_body("nope"))
        c = await h.post("/v1/embeddings", json={"model": "nope", "input": "x"})
        d = await h.get("/v1/nothing-here")
    assert openai_error(a, 404, "model")["code"] == "model_not_found"
    anthropic_error(b, 404, "not_found_error")
    openai_error(c, 404, "model")
    assert d.status_code == 404 and "error" in d.json()


# ---- 413 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversize_body_is_a_413_in_each_shape(server: Server, chunked: bool) -> None:
    limit = server.state.config.server.max_body_bytes
    payload = json.dumps(chat_body(content="x" * (limit + 10))).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    async with server.http() as h:
        for path in ("/v1/chat/completions", "/v1/messages"):
            content: Any = chunks() if chunked else payload
            r = await h.post(path, content=content, headers=JSON_TYPE)
            if path == "/v1/messages":
                anthropic_error(r, 413, "request_too_large")
            else:
                assert openai_error(r, 413)["code"] == "request_too_large"


# ---- 401 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def keyed(anyio_backend: str, stub_registry: BackendRegistry) -> AsyncIterator[Server]:
    config = serve_config(api_keys=(KEY,), admin_keys=(ADMIN_KEY,))
    async with running_server(config, stub_registry) as srv:
        yield srv


async def test_health_needs_no_key_and_everything_else_does(keyed: Server) -> None:
    async with keyed.http() as h:
        assert (await h.get("/health")).status_code == 200
        for path in ("/metrics", "/v1/models", "/admin/models"):
            r = await h.get(path)
            assert openai_error(r, 401)["code"] == "missing_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        r = await h.post("/v1/messages", json=messages_body())
        anthropic_error(r, 401, "authentication_error")


async def test_a_wrong_key_is_a_401_and_both_headers_carry_a_right_one(keyed: Server) -> None:
    async with keyed.http() as h:
        wrong = await h.get("/v1/models", headers={"authorization": "Bearer sk-wrong-key"})
        assert openai_error(wrong, 401)["code"] == "invalid_api_key"
        bearer = await h.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        header = await h.post("/v1/messages", json=messages_body(), headers={"x-api-key": KEY})
    assert bearer.status_code == 200 and header.status_code == 200


# ---- 429, 409, 503 ---------------------------------------------------------------------------


async def test_a_full_queue_is_a_429_with_retry_after(server: Server) -> None:
    async with (
        own_model(server, control=gated(), max_queue=0) as (mid, control),
        server.http() as h,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(functools.partial(h.post, "/v1/chat/completions", json=chat_body(mid)))
        try:
            await wait_for(lambda: control.waiting == 1)  # the first request holds the model
            r = await h.post("/v1/chat/completions", json=chat_body(mid))
            a = await h.post("/v1/messages", json=messages_body(mid))
        finally:
            control.open()
    assert openai_error(r, 429)["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "1"
    anthropic_error(a, 429, "rate_limit_error")


async def test_a_busy_session_is_a_409(server: Server) -> None:
    body = chat_body("", erllama={"session_id": "s"})
    async with (
        own_model(server, control=gated(), n_seq_max=2) as (mid, control),
        server.http() as h,
        anyio.create_task_group() as tg,
    ):
        body["model"] = mid
        tg.start_soon(functools.partial(h.post, "/v1/chat/completions", json=body))
        try:
            await wait_for(lambda: control.waiting == 1)
            r = await h.post("/v1/chat/completions", json=body)
        finally:
            control.open()
    assert openai_error(r, 409, "erllama.session_id")["code"] == "session_busy"


async def test_a_failed_model_is_a_503_that_clients_do_not_retry(server: Server) -> None:
    async with own_model(server, fail_at="step") as (mid, _), server.http() as h:
        first = await h.post("/v1/chat/completions", json=chat_body(mid, max_tokens=4))
        openai_error(first, 503)
        await wait_for(lambda: server.engine.status(mid) == "failed")
        again = await h.post("/v1/chat/completions", json=chat_body(mid, max_tokens=4))
        a = await h.post("/v1/messages", json=messages_body(mid))
        streamed = await h.post("/v1/chat/completions", json=chat_body(mid, stream=True))
    assert openai_error(again, 503)["code"] == "model_failed"
    assert again.headers["x-should-retry"] == "false"
    anthropic_error(a, 503, "overloaded_error")
    assert streamed.status_code == 503  # refused before the stream began


async def test_a_failure_mid_stream_is_an_error_event_in_each_shape(server: Server) -> None:
    async with own_model(server, fail_at="step", fail_step=3) as (mid, _), server.http() as h:
        r = await h.post("/v1/chat/completions", json=chat_body(mid, stream=True, max_tokens=20))
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "server_error"
    assert "data: [DONE]" not in r.text
    async with own_model(server, fail_at="step", fail_step=3) as (mid, _), server.http() as h:
        a = await h.post("/v1/messages", json=messages_body(mid, stream=True))
    assert a.status_code == 200
    assert a.text.startswith("event: message_start")
    assert "event: error" in a.text and "message_stop" not in a.text


async def test_a_loading_model_is_a_503_with_retry_after(server: Server) -> None:
    server.state.loading.add("arriving")
    try:
        async with server.http() as h:
            r = await h.post("/v1/chat/completions", json=chat_body("arriving"))
    finally:
        server.state.loading.discard("arriving")
    assert openai_error(r, 503)["code"] == "model_loading"
    assert r.headers["retry-after"] == "1"


# ---- never a 500 -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "seed", "stop", "stream", "stream_options", "tools", "tool_choice",
    "response_format", "n", "erllama", "system", "stop_sequences", "thinking", "prompt",
    "input", "encoding_format", "output_config", "id", "model_path", "backend",
    # The Responses API's
    "instructions", "previous_response_id", "text", "max_output_tokens", "store", "reasoning",
    "metadata", "truncation", "background", "include",
    # Ollama's
    "options", "format", "think", "keep_alive", "context", "raw", "images", "suffix",
    "template", "truncate", "name",
    # Sampling, choices and constraints (OpenAI's, llama-server's)
    "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "echo",
    "best_of", "grammar", "json_schema", "repeat_penalty", "repeat_last_n", "min_p",
    "content", "tokens", "add_special", "with_pieces",
]  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed requests with one or two fields replaced by anything."""
    base: dict[str, Any] = {
        "model": "plain",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "input": "hi",
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2)):
        base[name] = draw(JSON)
    return base


PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/admin/models",
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/tokenize",
    "/detokenize",
    "/apply-template",
]


async def test_bad_input_never_gives_a_500(server: Server) -> None:
    url = server.url  # read on the loop; hypothesis runs in a worker thread

    @settings(max_examples=examples(1.0), suppress_health_check=list(HealthCheck))
    @given(body=bodies(), path=st.sampled_from(PATHS))
    def check(body: dict[str, Any], path: str) -> None:
        raw = json.dumps(body, allow_nan=True)  # NaN and Infinity too: Python's json reads them
        with httpx.Client(base_url=url, timeout=30) as h:
            r = h.post(path, content=raw, headers=JSON_TYPE)
        assert r.status_code < 500 or r.status_code == 503, (path, raw, r.text)
        assert r.headers["content-type"].startswith(
            ("application/json", "text/event-stream", "application/x-ndjson")
        )
        if r.status_code >= 400 and path.startswith("/api/"):
            assert set(r.json()) == {"error"}, (path, raw, r.text)  # Ollama's shape

    await anyio.to_thread.run_sync(check)
