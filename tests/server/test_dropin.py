"""What clients switching from llama-server, vLLM or OpenAI send next (issue 18), on stub
models: tool calls whatever the config, sampling fields, ``n``, ``echo``, embeddings,
llama-server's routes and fields, and the errors they expect. SmolLM2's side (log
probabilities, forced calls without configured markers) is in test_dropin_real.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import attrs
import openai
import pytest

from erllama.backends.stub import StubControl
from erllama.backends.types import Decode, Prefill
from erllama.plugins import BackendRegistry
from erllama.sampling import SamplerParams

from ..helpers import stub_config
from .conftest import (
    ANTHROPIC_WEATHER_TOOL,
    CALL_JSON,
    KEY,
    TOOL_SCRIPT,
    WEATHER_TOOL,
    Server,
    chat_body,
    own_model,
    running_server,
    serve_config,
)

pytestmark = pytest.mark.anyio


def client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=30)


def user(text: str = "weather?") -> list[Any]:
    return [{"role": "user", "content": text}]


# ---- tool calls whatever the config ----------------------------------------------------------


async def test_a_model_configured_without_markers_still_returns_its_calls(server: Server) -> None:
    # No tool_call_markers in its config, no template naming any: the engine matches
    # Hermes' pair, which is what the server tells such a model to write. (Forced calls
    # need a real grammar sampler: test_dropin_real.py.)
    async with own_model(server, script=TOOL_SCRIPT) as (mid, _), client(server) as c:
        assert server.engine.model_info(mid).tool_call_markers == ("<tool_call>", "</tool_call>")
        r = await c.chat.completions.create(
            model=mid, messages=user(), tools=[WEATHER_TOOL], max_tokens=200
        )
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_without_detect_markers_and_markers_a_call_is_text(server: Server) -> None:
    config = attrs.evolve(stub_config(script=TOOL_SCRIPT), detect_markers=False)
    await server.engine.load_model("unmarked", config)
    try:
        assert server.engine.model_info("unmarked").tool_call_markers is None
        async with client(server) as c:
            r = await c.chat.completions.create(
                model="unmarked", messages=user(), tools=[WEATHER_TOOL], max_tokens=200
            )
    finally:
        await server.engine.unload("unmarked")
    assert CALL_JSON in (r.choices[0].message.content or "")
    assert not r.choices[0].message.tool_calls


# ---- sampling fields -------------------------------------------------------------------------


def sampler_of(control: StubControl) -> SamplerParams:
    """The sampler chain the last request ran with (what reached the model)."""
    decodes = [op for ops in control.history for op in ops if isinstance(op, Decode)]
    assert decodes and decodes[-1].sampler is not None
    params: SamplerParams = decodes[-1].sampler.params
    return params


async def test_openai_and_llama_server_sampling_fields_reach_the_sampler(server: Server) -> None:
    async with own_model(server, script="kabo rite") as (mid, ctl), client(server) as c:
        await c.chat.completions.create(
            model=mid, messages=user(), max_tokens=4, presence_penalty=0.5,
            frequency_penalty=-0.25, logit_bias={"300": 7, "301": -100}, seed=7,
            extra_body={"min_p": 0.05, "top_k": 12, "repeat_penalty": 1.1, "repeat_last_n": 32},
        )  # fmt: skip
        chat = sampler_of(ctl)
        await c.completions.create(
            model=mid, prompt="go", max_tokens=4, presence_penalty=1.0,
            logit_bias={"302": 3}, extra_body={"repetition_penalty": 1.3, "penalty_last_n": 8},
        )  # fmt: skip
        legacy = sampler_of(ctl)
    assert (chat.presence_penalty, chat.frequency_penalty) == (0.5, -0.25)
    assert dict(chat.logit_bias) == {300: 7.0, 301: -100.0}
    assert (chat.min_p, chat.top_k, chat.repetition_penalty, chat.penalty_last_n) == (
        0.05, 12, 1.1, 32,
    )  # fmt: skip
    assert chat.seed == 7
    assert legacy.presence_penalty == 1.0 and dict(legacy.logit_bias) == {302: 3.0}
    assert (legacy.repetition_penalty, legacy.penalty_last_n) == (1.3, 8)


# ---- log probabilities -----------------------------------------------------------------------


async def test_chat_logprobs_in_openais_shape_streamed_and_not(server: Server) -> None:
    async with client(server) as c:
        whole = await c.chat.completions.create(
            model="plain", messages=user(), max_tokens=32, logprobs=True, top_logprobs=3,
            temperature=0,
        )  # fmt: skip
        stream = await c.chat.completions.create(
            model="plain", messages=user(), max_tokens=32, logprobs=True, top_logprobs=3,
            temperature=0, stream=True,
        )  # fmt: skip
        chunks = [ch async for ch in stream]
        plain = await c.chat.completions.create(model="plain", messages=user(), max_tokens=4)
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.content
    # One entry per answer token; their text is the reply's, their bytes the tokens' own.
    assert "".join(t.token for t in lp.content) == whole.choices[0].message.content
    for t in lp.content:
        assert bytes(t.bytes or []).decode() == t.token
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content or []]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in lp.content]
    assert plain.choices[0].logprobs is None


async def test_legacy_completion_logprobs_are_parallel_lists_with_text_offsets(
    server: Server,
) -> None:
    async with client(server) as c:
        r = await c.completions.create(
            model="plain", prompt="go", max_tokens=5, logprobs=2, temperature=0
        )
        stream = await c.completions.create(
            model="plain", prompt="go", max_tokens=5, logprobs=2, temperature=0, stream=True
        )
        chunks = [ch async for ch in stream]
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.tokens or []]  # fmt: skip
    assert streamed == lp.tokens


# ---- n choices, echo ----------------------------------------------------------------------------


async def test_n_choices_count_the_prompt_once_and_a_seed_makes_each_reproducible(
    server: Server,
) -> None:
    async with own_model(server, eog_every=0) as (mid, _), client(server) as c:
        three = await c.chat.completions.create(
            model=mid, messages=user(), max_tokens=6, n=3, seed=41, temperature=1.0
        )
        # Choice i runs with seed + i: choice 2 alone, with seed 43, is the same reply.
        alone = await c.chat.completions.create(
            model=mid, messages=user(), max_tokens=6, seed=43, temperature=1.0
        )
        stream = await c.chat.completions.create(
            model=mid, messages=user(), max_tokens=6, n=3, seed=41, temperature=1.0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [ch async for ch in stream]
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in three.choices]
    assert len(set(texts)) == 3  # three seeds, three replies
    assert alone.choices[0].message.content == texts[2]
    assert three.usage is not None and alone.usage is not None
    assert three.usage.prompt_tokens == alone.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * alone.usage.completion_tokens
    by_index: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert [by_index[i] for i in range(3)] == texts
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        three.usage.completion_tokens
    )


async def test_n_choices_prefill_the_prompt_once(server: Server) -> None:
    """The n requests are queued together; the first feeds the prompt, the others take its
    cells (issue 22) and re-feed only the last token, for their own logits."""
    import threading

    import anyio

    from ..helpers import wait_for

    control = StubControl(gate=threading.Event())
    async with own_model(server, control=control, n_seq_max=3) as (mid, _), client(server) as c:
        replies = []

        async def ask() -> None:
            replies.append(
                await c.chat.completions.create(
                    model=mid,
                    messages=user("a question of some length"),
                    max_tokens=4,
                    n=3,
                    temperature=0.0,
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            info = server.engine.model_info
            await wait_for(lambda: info(mid).running + info(mid).queue_len == 3)
            assert control.gate is not None
            control.gate.set()
    (three,) = replies
    assert three.usage is not None and three.usage.prompt_tokens_details is not None
    prompt = three.usage.prompt_tokens
    fed = sum(len(op.tokens) for ops in control.history for op in ops if isinstance(op, Prefill))
    assert fed == prompt + 2
    assert three.usage.prompt_tokens_details.cached_tokens == 0  # (the first choice's)
    texts = {ch.message.content for ch in three.choices}
    assert len(texts) == 1  # greedy: one prompt, one answer


async def test_legacy_completions_take_n_and_echo(server: Server) -> None:
    async with client(server) as c:
        r = await c.completions.create(model="plain", prompt="Once upon", max_tokens=3, echo=True)
        ids = await c.completions.create(model="plain", prompt=[5, 6], max_tokens=3, echo=True)
        two = await c.completions.create(model="plain", prompt="go", max_tokens=3, n=2)
        stream = await c.completions.create(
            model="plain", prompt="Once upon", max_tokens=3, echo=True, stream=True
        )
        streamed = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert r.choices[0].text == "Once upon kabo rite sanu" == streamed
    assert ids.choices[0].text.endswith(" kabo rite sanu")
    assert [ch.text for ch in two.choices] == [" kabo rite sanu"] * 2
    async with server.http() as h:
        both = await h.post(
            "/v1/completions",
            json={"model": "plain", "prompt": "x", "echo": True, "logprobs": 1},
        )
        best = await h.post("/v1/completions", json={"model": "plain", "prompt": "x", "best_of": 3})
    assert both.status_code == 400 and both.json()["error"]["param"] == "echo"
    assert best.status_code == 400 and best.json()["error"]["param"] == "best_of"


# ---- errors clients look for -----------------------------------------------------------------


async def test_a_prompt_too_long_for_the_context_is_a_400_with_its_code(server: Server) -> None:
    long = "kabo " * 5000
    async with client(server) as c:
        with pytest.raises(openai.BadRequestError) as chat:
            await c.chat.completions.create(model="plain", messages=user(long), max_tokens=4)
        with pytest.raises(openai.BadRequestError) as legacy:
            await c.completions.create(model="plain", prompt=long, max_tokens=4)
    for err in (chat, legacy):
        body: Any = err.value.body
        assert err.value.code == "context_length_exceeded"
        assert "do not fit the context" in body["message"]
    assert chat.value.param == "messages" and legacy.value.param == "prompt"


# ---- llama-server's routes and fields --------------------------------------------------------


async def test_the_openai_routes_answer_without_v1_as_llama_server_does(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="-", max_retries=0) as c:
        chat = await c.chat.completions.create(model="plain", messages=user(), max_tokens=2)
        legacy = await c.completions.create(model="plain", prompt="go", max_tokens=2)
        vectors = await c.embeddings.create(model="plain", input="kabo")
        models = await c.models.list()
    assert chat.choices[0].message.content == " kabo rite"
    assert legacy.choices[0].text == " kabo rite"
    assert len(vectors.data[0].embedding) == 32
    assert "plain" in {m.id for m in models.data}


async def test_tokenize_detokenize_and_apply_template(server: Server) -> None:
    async with server.http() as h:
        tok = await h.post("/tokenize", json={"model": "plain", "content": "kabo rite"})
        pieces = await h.post(
            "/tokenize", json={"model": "plain", "content": "kabo rite", "with_pieces": True}
        )
        ids = tok.json()["tokens"]
        detok = await h.post("/detokenize", json={"model": "plain", "tokens": ids})
        tmpl = await h.post("/apply-template", json={"model": "plain", "messages": user("kabo")})
        unnamed = await h.post("/tokenize", json={"content": "kabo"})
    # The engine's own tokenizer, without the BOS (llama-server's add_special default).
    assert ids == await server.engine.tokenize("plain", "kabo rite", add_special=False)
    assert [p["id"] for p in pieces.json()["tokens"]] == ids
    text = await server.engine.detokenize("plain", ids)
    assert "".join(p["piece"] for p in pieces.json()["tokens"]) == text
    assert detok.json() == {"content": text} and text.strip() == "kabo rite"
    template_ids = await server.engine.apply_chat_template("plain", user("kabo"))
    assert tmpl.json()["prompt"] == await server.engine.detokenize(
        "plain", template_ids, special=True
    )
    # Several models here: a request must say which.
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"


async def test_an_unknown_route_is_a_404_naming_it_and_the_routes_there_are(
    server: Server,
) -> None:
    async with server.http() as h:
        r = await h.post("/v1/v1/chat/completions", json={})
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "route_not_found"
    assert error["message"].startswith("no route POST /v1/v1/chat/completions; ")
    assert "POST /v1/chat/completions" in error["message"] and "POST /tokenize" in error["message"]


async def test_embeddings_are_unit_length_unless_asked_raw(server: Server) -> None:
    async with client(server) as c:
        r = await c.embeddings.create(model="plain", input=["kabo rite", "sanu"])
    raw = await server.engine.embed("plain", "sanu")
    norm = sum(v * v for v in raw) ** 0.5
    for d in r.data:
        assert sum(v * v for v in d.embedding) == pytest.approx(1.0, rel=1e-6)
    assert r.data[1].embedding == pytest.approx([v / norm for v in raw], rel=1e-6)
    async with server.http() as h:
        as_is = await h.post(
            "/v1/embeddings", json={"model": "plain", "input": "sanu", "embd_normalize": -1}
        )
        dims = await h.post(
            "/v1/embeddings", json={"model": "plain", "input": "sanu", "dimensions": 8}
        )
    assert as_is.json()["data"][0]["embedding"] == pytest.approx(raw, rel=1e-6)
    assert dims.status_code == 400 and dims.json()["error"]["param"] == "dimensions"


# ---- a keyed server with CORS and a default model ---------------------------------------------

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
async def keyed(anyio_backend: str, stub_registry: BackendRegistry) -> AsyncIterator[Server]:
    config = serve_config(
        api_keys=(KEY,), cors_origins=(ORIGIN,), default_model="plain", admin=False
    )
    async with running_server(config, stub_registry) as srv:
        yield srv


async def test_a_preflight_is_answered_before_the_key_check(keyed: Server) -> None:
    async with keyed.http() as h:
        for path in ("/v1/chat/completions", "/chat/completions", "/tokenize"):
            preflight = await h.options(
                path,
                headers={
                    "origin": ORIGIN,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "content-type,authorization",
                },
            )
            assert preflight.status_code == 200, path
            assert preflight.headers["access-control-allow-origin"] == ORIGIN
        # The request itself still needs the key, and its 401 is readable by the page.
        refused = await h.post("/v1/chat/completions", json=chat_body(), headers={"origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN


async def test_the_default_model_serves_any_name(keyed: Server) -> None:
    async with openai.AsyncOpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0) as c:
        r = await c.chat.completions.create(model="gpt-4o", messages=user(), max_tokens=2)
    async with anthropic.AsyncAnthropic(base_url=keyed.url, api_key=KEY, max_retries=0) as a:
        m = await a.messages.create(
            model="claude-sonnet-4-5", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    async with keyed.http(headers={"authorization": f"Bearer {KEY}"}) as h:
        tok = await h.post("/tokenize", json={"content": "kabo"})
        tags = await h.post(
            "/api/chat", json={"model": "llama3", "messages": user(), "stream": False}
        )
    assert r.model == "plain" and r.choices[0].message.content == " kabo rite"
    assert m.content[0].text == " kabo rite"  # type: ignore[union-attr]
    assert tok.json()["tokens"] == await keyed.engine.tokenize("plain", "kabo", add_special=False)
    assert tags.status_code == 200 and tags.json()["message"]["content"]


# ---- tool-call arguments stream ----------------------------------------------------------------


async def test_anthropic_input_json_deltas_are_the_arguments_the_model_wrote(
    server: Server,
) -> None:
    a = anthropic.AsyncAnthropic(base_url=server.url, api_key="-", max_retries=0)
    async with a, a.messages.stream(
        model="tools", max_tokens=200, messages=[{"role": "user", "content": "weather?"}],
        tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:  # fmt: skip
        events = [e async for e in stream]
        final = await stream.get_final_message()
    parts = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(parts) > 1 and "".join(parts) == '{"city":"Paris"}'
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.input == {"city": "Paris"} and final.stop_reason == "tool_use"


async def test_a_streamed_call_cut_short_stays_a_call_and_ends_with_length(
    server: Server,
) -> None:
    async with client(server) as c:
        stream = await c.chat.completions.create(
            model="tools", messages=user(), tools=[WEATHER_TOOL], max_tokens=68, stream=True
        )
        chunks = [ch async for ch in stream]
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert '{"city":"Paris"}'.startswith(arguments) and arguments != '{"city":"Paris"}'
    assert content == "Let me check. "  # the call's text is not sent twice (68 tokens: inside it)
    assert chunks[-1].choices[0].finish_reason == "length"


# ---- speculative decoding ----------------------------------------------------------------------


async def test_speculative_fields_reach_the_engine_and_its_counts_come_back(
    server: Server,
) -> None:
    import httpx

    from ..helpers import words

    text = words(30, start=40)
    config = attrs.evolve(stub_config(script=text), speculative={"draft_max": 8})
    await server.engine.load_model("spec", config)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = chat_body("spec", "Copy: " + text, max_tokens=60, temperature=0)
            drafted = (await http.post("/v1/chat/completions", json=body)).json()
            plain = (
                await http.post("/v1/chat/completions", json={**body, "speculative": False})
            ).json()
            capped = (
                await http.post("/v1/chat/completions", json={**body, "speculative.n_max": 0})
            ).json()
            refused = await http.post(
                "/v1/chat/completions", json={**body, "logprobs": True, "speculative": True}
            )
            bad = await http.post("/v1/chat/completions", json={**body, "speculative.n_max": 63})
            metrics = (await http.get("/metrics")).text
    finally:
        await server.engine.unload("spec")
    content = drafted["choices"][0]["message"]["content"]
    assert (
        content
        == plain["choices"][0]["message"]["content"]
        == capped["choices"][0]["message"]["content"]
    )
    spec = drafted["erllama"]["speculative"]
    assert spec["accepted"] >= 20 and spec["draft_tokens"] >= spec["accepted"]
    assert (
        plain["erllama"]["speculative"]
        == capped["erllama"]["speculative"]
        == {
            "draft_tokens": 0,
            "accepted": 0,
        }
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "speculative"
    assert "logprobs" in refused.json()["error"]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative.n_max"
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('erllama_draft_accepted_tokens_total{model="spec"}')
    )
    assert float(line.split()[-1]) == spec["accepted"]
