"""The Ollama-compatible routes, driven by the official ``ollama`` package (its async
client; the sync one from a worker thread) against the real server on stub models.

The ``ollama`` client drops fields it does not model (the ``erllama`` object), so the
cache outcome of a request is read from the engine's ``last_cache_hit`` or over raw HTTP."""

from __future__ import annotations

import json
from typing import Any

import anyio
import ollama
import pytest

import erllama
from erllama.plugins import BackendRegistry
from erllama.server.keepalive import DEFAULT_KEEP_ALIVE_S, parse_keep_alive
from erllama.server.ollama_models import OLLAMA_VERSION

from ..helpers import wait_for
from .conftest import (
    KEY,
    PLAIN_SCRIPT,
    WEATHER_TOOL,
    Served,
    Server,
    own_model,
    running_server,
    serve_config,
)

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0.0}


def client(server: Served) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=server.url, timeout=30)


def user(text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- chat ------------------------------------------------------------------------------------


async def test_a_chat_returns_the_reply_and_ollamas_figures(served: Served) -> None:
    c = client(served)
    r = await c.chat(model="plain", messages=user(), stream=False, options=GREEDY)
    assert r.model == "plain" and r.done and r.done_reason == "stop"
    assert r.message.role == "assistant" and r.message.content == " " + PLAIN_SCRIPT
    assert r.eval_count is not None and r.eval_count >= 5  # five words
    assert r.prompt_eval_count and r.prompt_eval_count > 0
    assert r.total_duration and r.total_duration >= (r.eval_duration or 0) > 0
    # The model is loaded: its "load" is the check that it is (microseconds).
    assert r.load_duration is not None and 0 <= r.load_duration < r.total_duration
    assert r.created_at and r.created_at.endswith("Z")


async def test_prompt_eval_count_is_the_rendered_prompt(server: Server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *user("kabo rite")]
    rendered = await server.engine.apply_chat_template("plain", messages)
    r = await client(server).chat(model="plain:latest", messages=messages, stream=False)
    assert r.prompt_eval_count == len(rendered)
    assert r.model == "plain:latest"  # the name as the client gave it


async def test_a_streamed_chat_is_lines_ending_in_the_figures(served: Served) -> None:
    c = client(served)
    whole = await c.chat(model="plain", messages=user(), stream=False)
    parts = [p async for p in await c.chat(model="plain", messages=user(), stream=True)]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == whole.eval_count
    assert last.prompt_eval_count == whole.prompt_eval_count


async def test_the_raw_stream_is_ndjson_with_erllamas_cache_figures(server: Server) -> None:
    body = {"model": "plain", "messages": user("kabo " * 40)}  # streams by default
    async with server.http() as h:
        first = await h.post("/api/chat", json=body)
        again = await h.post("/api/chat", json=body)
    assert first.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in again.text.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    cache = lines[-1]["erllama"]["cache"]
    # The same prompt again: all of it but its last token was kept in the model's KV.
    assert cache["tokens_restored"] >= lines[-1]["prompt_eval_count"] - 1


async def test_num_predict_stop_and_seed_are_applied(server: Server) -> None:
    c = client(server)
    cut = await c.chat(model="plain", messages=user(), stream=False, options={"num_predict": 2})
    stopped = await c.chat(model="plain", messages=user(), stream=False, options={"stop": ["sanu"]})
    assert cut.done_reason == "length" and cut.eval_count == 2
    assert stopped.message.content == " kabo rite "
    free = [
        await c.chat(
            model="free", messages=user(), stream=False, options={"seed": 7, "num_predict": 6}
        )
        for _ in range(2)
    ]
    other = await c.chat(
        model="free", messages=user(), stream=False, options={"seed": 8, "num_predict": 6}
    )
    assert free[0].message.content == free[1].message.content != other.message.content


async def test_a_smaller_num_ctx_bounds_prompt_and_reply(server: Server) -> None:
    c = client(server)
    prompt = len(await server.engine.apply_chat_template("free", user()))
    r = await c.chat(model="free", messages=user(), stream=False, options={"num_ctx": prompt + 3})
    assert r.done_reason == "length" and r.eval_count == 3
    with pytest.raises(ollama.ResponseError) as err:
        await c.chat(model="free", messages=user(), stream=False, options={"num_ctx": prompt})
    assert err.value.status_code == 400 and "options.num_ctx" in err.value.error
    # Larger than the loaded context: it cannot apply, and the model's own limits hold.
    big = await c.chat(model="free", messages=user(), stream=False, options={"num_ctx": 10**6, "num_predict": 4})  # fmt: skip
    assert big.eval_count == 4


async def test_without_options_ollamas_sampling_defaults_apply(server: Server) -> None:
    """No options: temperature 0.8, top_k 40, top_p 0.9, and the server's cap (Ollama's
    num_predict -1): the same seed gives what those explicit options give."""
    c = client(server)
    explicit = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 3, "num_predict": 8}
    a = await c.chat(
        model="free", messages=user(), stream=False, options={"seed": 3, "num_predict": 8}
    )
    b = await c.chat(model="free", messages=user(), stream=False, options=explicit)
    greedy = await c.chat(
        model="free", messages=user(), stream=False, options={**explicit, "temperature": 0}
    )
    assert a.message.content == b.message.content != greedy.message.content
    unbounded = await c.chat(
        model="free", messages=user(), stream=False, options={"num_predict": -1}
    )
    assert unbounded.eval_count == server.state.config.server.max_tokens


async def test_thinking_comes_back_in_its_own_field(server: Server) -> None:
    c = client(server)
    r = await c.chat(model="thinker", messages=user(), stream=False, think=True)
    assert r.message.thinking == " kabo rite " and r.message.content == " sanu mila"
    parts = [
        p async for p in await c.chat(model="thinker", messages=user(), think=True, stream=True)
    ]
    assert "".join(p.message.thinking or "" for p in parts) == " kabo rite "
    assert "".join(p.message.content or "" for p in parts) == " sanu mila"
    plain = await c.chat(model="thinker", messages=user(), stream=False)
    assert plain.message.thinking is None and "<think>" in (plain.message.content or "")
    with pytest.raises(ollama.ResponseError) as err:
        await c.chat(model="plain", messages=user(), stream=False, think=True)
    assert err.value.status_code == 400 and "does not support thinking" in err.value.error


# ---- tools -----------------------------------------------------------------------------------


async def test_a_tool_round_trip_replays_the_exact_reply(server: Server) -> None:
    c = client(server)
    question = user("what is the weather in paris? " * 4)
    first = await c.chat(model="tools", messages=question, tools=[WEATHER_TOOL], stream=False)
    (call,) = first.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert first.message.content == "Let me check. "
    prompt_tokens = first.prompt_eval_count or 0
    # The history as the client sends it back: no call ids, arguments as a mapping.
    history = [
        *question,
        first.message,
        {"role": "tool", "content": '{"temp_c": 21}', "tool_name": "get_weather"},
    ]
    second = await c.chat(model="tools", messages=history, tools=[WEATHER_TOOL], stream=False)
    hit = server.engine.model_info("tools").last_cache_hit
    assert hit is not None
    # Rendered from its exact text, the whole first turn (prompt and reply) is reused.
    assert hit.prefix_len >= prompt_tokens + (first.eval_count or 0) - 1
    assert second.message.tool_calls  # the scripted model calls again


async def test_a_changed_tool_call_is_rendered_from_its_fields(server: Server) -> None:
    """An assistant message that is not one this server sent is rendered from its fields:
    content, then the call in the Hermes format."""
    history = [
        *user(),
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "4 C"},
    ]
    expected = [
        *user(),
        {
            "role": "assistant",
            "content": 'Checking.<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>',
        },
        {"role": "tool", "content": "4 C"},
    ]
    rendered = await server.engine.apply_chat_template("tools", expected, None, [WEATHER_TOOL])
    r = await client(server).chat(
        model="tools", messages=history, tools=[WEATHER_TOOL], stream=False
    )
    assert r.prompt_eval_count == len(rendered)


async def test_a_streamed_tool_call_is_one_line(served: Served) -> None:
    stream = await client(served).chat(
        model="tools", messages=user(), tools=[WEATHER_TOOL], stream=True
    )
    parts = [p async for p in stream]
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


# ---- generate --------------------------------------------------------------------------------


async def test_generate_returns_its_context_and_continues_it(server: Server) -> None:
    c = client(server)
    first = await c.generate(
        model="plain", prompt="kabo rite " * 20, system="Be brief.", stream=False
    )
    assert first.response == " " + PLAIN_SCRIPT and first.done_reason == "stop"
    context = list(first.context or [])
    rendered = await server.engine.apply_chat_template(
        "plain", [{"role": "system", "content": "Be brief."}, *user("kabo rite " * 20)]
    )
    # The context is the prompt, the reply and the end-of-generation token, as generated.
    assert context[: len(rendered)] == rendered
    assert len(context) - len(rendered) in (first.eval_count, (first.eval_count or 0) + 1)
    second = await c.generate(model="plain", prompt="sanu", context=context, stream=False)
    hit = server.engine.model_info("plain").last_cache_hit
    assert list(second.context or [])[: len(context)] == context
    assert hit is not None and hit.prefix_len == len(context)  # the whole context, reused


async def test_generate_streams_and_takes_raw_prompts(server: Server) -> None:
    c = client(server)
    parts = [p async for p in await c.generate(model="plain", prompt="kabo", stream=True)]
    assert "".join(p.response for p in parts) == " " + PLAIN_SCRIPT
    assert parts[-1].done and parts[-1].context
    raw = await c.generate(model="plain", prompt="kabo rite", raw=True, stream=False)
    ids = await server.engine.tokenize("plain", "kabo rite", parse_special=True)
    assert raw.prompt_eval_count == len(ids)


async def test_an_empty_request_reports_the_model_loaded(server: Server) -> None:
    c = client(server)
    g = await c.generate(model="plain", stream=False)
    assert g.done and g.done_reason == "load" and g.response == ""
    r = await c.chat(model="plain", messages=[], stream=False)
    assert r.done_reason == "load"
    with pytest.raises(ollama.ResponseError) as err:
        await c.generate(model="nope")
    assert err.value.status_code == 404


# ---- embeddings ------------------------------------------------------------------------------


async def test_embed_matches_the_openai_route(server: Server) -> None:
    c = client(server)
    r = await c.embed(model="plain", input=["kabo rite", "sanu"])
    async with server.http() as h:
        reference = (
            await h.post("/v1/embeddings", json={"model": "plain", "input": ["kabo rite", "sanu"]})
        ).json()
    assert len(r.embeddings) == 2
    for got, ref in zip(r.embeddings, reference["data"], strict=True):
        assert list(got) == pytest.approx(ref["embedding"], rel=1e-6)
    assert r.prompt_eval_count == reference["usage"]["prompt_tokens"]
    old = await c.embeddings(model="plain", prompt="sanu")
    assert list(old.embedding) == pytest.approx(r.embeddings[1], rel=1e-6)


async def test_embed_truncates_to_the_context_unless_told_not_to(server: Server) -> None:
    c = client(server)
    n_ctx = server.engine.model_info("plain").n_ctx
    long = "kabo " * (n_ctx + 10)
    r = await c.embed(model="plain", input=long)
    assert r.prompt_eval_count == n_ctx
    with pytest.raises(ollama.ResponseError) as err:
        await c.embed(model="plain", input=long, truncate=False)
    assert err.value.status_code == 400 and "context" in err.value.error


# ---- models ----------------------------------------------------------------------------------


async def test_tags_ps_show_and_version(served: Served) -> None:
    c = client(served)
    tags = await c.list()
    names = {m.model for m in tags.models}
    assert {"plain:latest", "tools:latest", "thinker:latest"} <= names
    plain = next(m for m in tags.models if m.model == "plain:latest")
    assert plain.digest and plain.details and plain.details.family == "stub"
    running = await c.ps()
    assert {m.model for m in running.models} == names
    assert all(m.context_length == 512 and m.expires_at for m in running.models)
    info = await c.show("thinker:latest")
    assert info.capabilities is not None and "thinking" in info.capabilities
    assert info.modelinfo is not None and info.modelinfo["stub.context_length"] == 512
    assert "thinking" not in ((await c.show("plain")).capabilities or [])
    async with served.http() as h:
        assert (await h.get("/api/version")).json() == {"version": OLLAMA_VERSION}
        missing = await h.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


async def test_a_key_is_needed_when_set_and_requests_are_counted(
    stub_registry: BackendRegistry,
) -> None:
    async with running_server(serve_config(api_keys=(KEY,), admin=False), stub_registry) as keyed:
        with pytest.raises(ollama.ResponseError) as err:
            await client(keyed).list()
        assert err.value.status_code == 401 and "API key" in err.value.error
        signed = ollama.AsyncClient(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
        r = await signed.chat(model="plain", messages=user(), stream=False)
        assert r.done

        def text() -> str:
            return keyed.state.metrics.exposition("")[0].decode()

        # A route is counted once its response is sent, maybe after the client has it.
        await wait_for(lambda: 'route="/api/chat",status="200"' in text())
    assert 'erllama_requests_total{api="ollama",model="plain",outcome="stop"} 1.0' in text()
    assert 'route="/api/tags",status="401"' in text()


async def test_the_sync_client_works_from_a_worker_thread(server: Server) -> None:
    url = server.url

    def run() -> str:
        r = ollama.Client(host=url, timeout=30).chat(model="plain", messages=user(), stream=False)
        return r.message.content or ""

    assert await anyio.to_thread.run_sync(run) == " " + PLAIN_SCRIPT


# ---- refusals and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"keep_alive": True}, "keep_alive"),
        ({"format": "xml"}, "format"),
        ({"options": {"num_predict": 0}}, "options.num_predict"),
        ({"options": {"num_predict": 10**6}}, "options.num_predict"),
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"options": {"top_p": 0}}, "options.top_p"),
        ({"options": {"frequency_penalty": 5}}, "options.frequency_penalty"),
        ({"options": {"repeat_last_n": -7}}, "options.repeat_last_n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"think": "always"}, "think"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_400_in_ollamas_shape(
    served: Served, change: dict[str, Any], fragment: str
) -> None:
    body = {"model": "plain", "messages": user(), "stream": False, **change}
    async with served.http() as h:
        r = await h.post("/api/chat", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and fragment in r.json()["error"]


async def test_generate_refuses_images_suffix_and_templates(server: Server) -> None:
    c = client(server)
    for kw in ({"images": [b"\x89PNG"]}, {"suffix": "end"}, {"template": "{{ .Prompt }}"}):
        with pytest.raises(ollama.ResponseError) as err:
            await c.generate(model="plain", prompt="x", stream=False, **kw)  # type: ignore[arg-type]
        assert err.value.status_code == 400


def plain_state(server: Server) -> erllama.ModelState:
    (found,) = [m for m in server.engine.model_states() if m.id == "plain"]
    return found


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), (-1, None), ("-1m", None), (30.5, 30.5)],
)
async def test_keep_alive_in_ollamas_forms_sets_the_models_keep_alive(
    server: Server, keep_alive: Any, seconds: float | None
) -> None:
    r = await client(server).chat(
        model="plain", messages=user(), stream=False, keep_alive=keep_alive
    )
    assert r.done
    plain = plain_state(server)
    assert plain.state == "loaded" and plain.keep_alive_s == seconds
    if seconds is None:
        assert plain.expires_at is None
    else:
        assert plain.expires_at == pytest.approx(plain.last_used_at + seconds)  # type: ignore[operator]
    # A request without keep_alive puts the model's own back (the config's: for good).
    await client(server).chat(model="plain", messages=user(), stream=False)
    assert plain_state(server).keep_alive_s is None


@pytest.mark.parametrize("keep_alive", ["0", 0])
async def test_keep_alive_zero_unloads_the_model_after_the_request(
    server: Server, keep_alive: Any
) -> None:
    c = client(server)
    before = plain_state(server).unloads.get("keep_alive", 0)
    r = await c.chat(model="plain", messages=user(), stream=False, keep_alive=keep_alive)
    assert r.done and r.message.content
    await wait_for(lambda: plain_state(server).state == "unloaded")
    assert plain_state(server).unloads.get("keep_alive", 0) == before + 1
    # The next request loads it again, with the model's own keep-alive.
    again = await c.chat(model="plain", messages=user(), stream=False)
    assert again.message.content == r.message.content
    assert plain_state(server).state == "loaded" and plain_state(server).keep_alive_s is None


async def test_an_empty_request_loads_and_keep_alive_zero_unloads(server: Server) -> None:
    c = client(server)
    await c.chat(model="plain", messages=[], keep_alive=0)
    await wait_for(lambda: plain_state(server).state == "unloaded")
    # An empty request with keep_alive 0 on an unloaded model loads nothing.
    r = await c.generate(model="plain", prompt="", keep_alive=0)
    assert r.done_reason == "unload" and plain_state(server).state == "unloaded"
    loaded = await c.generate(model="plain", prompt="")
    assert loaded.done_reason == "load" and plain_state(server).state == "loaded"


def test_keep_alive_parses_into_seconds_or_forever() -> None:
    assert parse_keep_alive(None) == DEFAULT_KEEP_ALIVE_S
    assert parse_keep_alive("5m") == 300.0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive("300ms") == pytest.approx(0.3)
    assert parse_keep_alive("0") == 0.0
    assert parse_keep_alive(90) == 90.0
    assert parse_keep_alive("90") == 90.0
    assert parse_keep_alive(-1) is None and parse_keep_alive("-5m") is None
    for bad in ("soon", "5 m", "m", "", "-", "1d", True, [5], float("inf")):
        with pytest.raises(ValueError, match=r"\w"):
            parse_keep_alive(bad)


async def test_a_failure_mid_stream_is_an_error_line(server: Server) -> None:
    async with own_model(server, fail_at="step", fail_step=3) as (mid, _):
        stream = await client(server).chat(model=mid, messages=user(), stream=True)
        with pytest.raises(ollama.ResponseError):
            async for _ in stream:
                pass
