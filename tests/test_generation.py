"""Stop strings, seeds, thinking spans and tool calls on the stub, with scripted output whose
markers and stop strings are split across tokens and across multi-byte characters."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import pytest

import erllama
from erllama import (
    Done,
    ThinkingDelta,
    ThinkingEnd,
    Token,
    ToolCallDelta,
    ToolCallEnd,
)
from erllama.backends import Decode, Prefill, stub
from erllama.backends.stub import StubControl

from .helpers import stub_config, wait_for

pytestmark = pytest.mark.anyio

THINK_TEMPLATE = "{% for m in messages %}<think>{{ m.content }}</think>{% endfor %}"


async def events_of(stream: erllama.InferStream) -> list[erllama.events.Event]:
    out = []
    async for ev in stream:
        out.append(ev)
    return out


def texts(events: Sequence[object], kind: type) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))  # type: ignore[attr-defined]


def pieces(ids: Sequence[int]) -> bytes:
    return b"".join(stub._piece(t) for t in ids)


# ---- stop strings ---------------------------------------------------------------------------


async def test_a_stop_string_ends_the_request_and_is_never_streamed(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config(script="kabo rite sanu mila tove"))
    r = await engine.complete(mid, "go", stop=["sanu"], max_tokens=20)
    assert r.text == " kabo rite "
    assert r.finish_reason == "stop" and r.stop_sequence == "sanu"
    assert r.stats.stop_sequence == "sanu"
    # The tokens that made the match were generated and are in the KV; nothing after.
    assert pieces(r.token_ids) == b" kabo rite sanu"
    assert r.context_tokens[-len(r.token_ids) :] == r.token_ids


async def test_a_stop_string_split_across_tokens_and_characters_matches(
    engine: erllama.Engine,
) -> None:
    # Non-syllable words are spelt in byte tokens: "ö" is two tokens, "wörld" six.
    mid = await engine.load_model("m", stub_config(script="héllo wörld again"))
    stream = await engine.infer(mid, "go", stop=["öw", "rld a"], max_tokens=40)
    events = await events_of(stream)
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.stats.stop_sequence == "rld a"
    assert texts(events, Token) == "héllo wö"
    # At every token, everything but at most (longest stop - 1) bytes, plus an unfinished
    # character, has been released.
    longest = max(len(s.encode()) for s in ("öw", "rld a"))
    released = b""
    produced = b""
    for ev in events:
        if isinstance(ev, Token):
            released += ev.text.encode()
            produced += stub._piece(ev.token_id)
            assert len(produced) - len(released) <= longest - 1 + 3
            assert not released.endswith(b"\xef\xbf\xbd")  # never a broken character


async def test_the_earliest_match_by_position_wins(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(script="kabo rite sanu mila"))
    r = await engine.complete(mid, "go", stop=["sanu", "rite sanu", "mila"], max_tokens=20)
    assert r.stop_sequence == "rite sanu" and r.text == " kabo "


async def test_without_a_match_the_held_text_is_released_at_the_end(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config(script="kabo rite sa"))
    r = await engine.complete(mid, "go", stop=["sanu"], max_tokens=20)
    assert r.finish_reason == "stop" and r.stop_sequence is None  # the script ended
    assert r.text == " kabo rite sa"


async def test_bad_stop_values_name_the_parameter(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    for stop, param in (([""], "stop[0]"), ([1], "stop[0]"), (["x"] * 17, "stop"), (b"x", "stop")):
        with pytest.raises(erllama.InvalidRequest) as exc:
            await engine.infer(mid, "go", stop=stop)  # type: ignore[arg-type]
        assert exc.value.param == param


async def test_the_end_of_generation_token_is_not_streamed(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(script="kabo rite"))
    events = await events_of(await engine.infer(mid, "go", max_tokens=20))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert [e.token_id for e in events if isinstance(e, Token)] == list(done.token_ids)
    assert stub.EOS not in done.token_ids
    assert done.context[-1] == stub.EOS  # it is in the KV all the same


# ---- seeds ----------------------------------------------------------------------------------


async def test_a_request_without_a_seed_gets_a_fresh_one_it_reports(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config())
    a = await engine.complete(mid, "tell", max_tokens=8, temperature=0.8)
    b = await engine.complete(mid, "tell", max_tokens=8, temperature=0.8)
    assert a.stats.seed != b.stats.seed
    again = await engine.complete(mid, "tell", max_tokens=8, temperature=0.8, seed=a.stats.seed)
    assert again.token_ids == a.token_ids and again.stats.seed == a.stats.seed


# ---- thinking -------------------------------------------------------------------------------


def thinking_model(**kw: object) -> erllama.ModelConfig:
    return stub_config(chat_template=THINK_TEMPLATE, **kw)


async def test_markers_named_by_the_chat_template_are_found(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", thinking_model(script="<think> kabo rite </think> sanu"))
    events = await events_of(await engine.infer(mid, "go", thinking=True, max_tokens=40))
    assert texts(events, ThinkingDelta) == " kabo rite "
    assert texts(events, Token) == " sanu"
    ends = [e for e in events if isinstance(e, ThinkingEnd)]
    assert len(ends) == 1 and ends[0].signature is None
    # Every thinking token is in the context (and so in the finish row's key).
    done = events[-1]
    assert isinstance(done, Done)
    assert pieces(done.token_ids) == b"<think> kabo rite </think> sanu"


async def test_without_thinking_the_span_streams_as_text(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", thinking_model(script="<think> kabo </think> sanu"))
    events = await events_of(await engine.infer(mid, "go", max_tokens=40))
    assert texts(events, Token) == "<think> kabo </think> sanu"
    assert not any(isinstance(e, ThinkingDelta | ThinkingEnd) for e in events)


async def test_thinking_is_signed_with_the_engine_key(
    registry: erllama.plugins.BackendRegistry,
) -> None:
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None), thinking_signing_key="s3"
    )
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", thinking_model(script="<think> kabo rite </think>"))
        r = await engine.complete(mid, "go", thinking=True, max_tokens=40)
    assert r.thinking == " kabo rite "
    expected = hmac.new(b"s3", b" kabo rite ", hashlib.sha256).hexdigest()
    assert r.thinking_signature == expected


async def test_the_thinking_budget_closes_the_span_in_the_models_context(
    engine: erllama.Engine,
) -> None:
    ctl = StubControl()
    mid = await engine.load_model(
        "m", thinking_model(control=ctl, script="<think> kabo rite sanu mila </think> tove")
    )
    events = await events_of(
        await engine.infer(mid, "go", thinking=True, thinking_budget_tokens=2, max_tokens=40)
    )
    assert [type(e) for e in events].count(ThinkingEnd) == 1
    assert texts(events, ThinkingDelta) == " kabo rite"  # two tokens, then the span closed
    end_marker = tuple(
        await engine.tokenize(mid, "</think>", add_special=False, parse_special=True)
    )
    fed = [op.tokens for ops in ctl.history for op in ops if isinstance(op, Prefill)]
    assert end_marker in fed  # the engine fed the end marker into the sequence
    done = events[-1]
    assert isinstance(done, Done)
    ctx = done.context
    at = next(i for i in range(len(ctx)) if ctx[i : i + len(end_marker)] == end_marker)
    assert at > 0


async def test_a_template_that_opens_thinking_starts_the_reply_inside_it(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", thinking_model(script="kabo </think> rite"))
    prompt = await engine.tokenize(mid, "question <think>", parse_special=True)
    r = await engine.complete(mid, prompt, thinking=True, max_tokens=20)
    assert r.thinking == " kabo " and r.text == " rite"


# ---- tool calls -----------------------------------------------------------------------------


def tool_model(**kw: object) -> erllama.ModelConfig:
    return attrs_evolve(
        stub_config(**kw),
        tool_call_markers=erllama.ToolCallMarkers(start="<tool_call>", end="</tool_call>"),
    )


def attrs_evolve(config: erllama.ModelConfig, **changes: object) -> erllama.ModelConfig:
    import attrs

    return attrs.evolve(config, **changes)  # type: ignore[misc]


SCRIPT = (
    'kabo <tool_call> {"name":"wéather"} </tool_call> rite <tool_call> {"name":"b"} </tool_call>'
)


async def test_tool_calls_stream_deltas_and_end_with_their_exact_text(
    engine: erllama.Engine,
) -> None:
    ctl = StubControl()
    mid = await engine.load_model("m", tool_model(control=ctl, script=SCRIPT))
    events = await events_of(await engine.infer(mid, "go", max_tokens=200, temperature=0.7))
    ends = [e.text for e in events if isinstance(e, ToolCallEnd)]
    assert ends == [
        '<tool_call> {"name":"wéather"} </tool_call>',
        '<tool_call> {"name":"b"} </tool_call>',
    ]
    assert texts(events, ToolCallDelta) == "".join(ends)
    assert texts(events, Token) == " kabo  rite "
    # Inside a call's syntax every decode was greedy; outside none was.
    decodes = [op for ops in ctl.history for op in ops if isinstance(op, Decode)]
    assert any(op.greedy for op in decodes) and not all(op.greedy for op in decodes)


async def test_a_call_cut_off_by_max_tokens_is_answer_text_not_a_call(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", tool_model(script=SCRIPT))
    # Words the stub knows are one token, others a byte a token: 30 end inside the call.
    events = await events_of(await engine.infer(mid, "go", max_tokens=30))
    assert not [e for e in events if isinstance(e, ToolCallEnd)]
    cut = texts(events, ToolCallDelta)
    assert cut.startswith("<tool_call> {") and not cut.endswith("</tool_call>")
    # The call's text comes again as the last answer token, after the deltas.
    last = [e for e in events if not isinstance(e, Done)][-1]
    assert isinstance(last, Token) and last.text == cut
    assert texts(events, Token) == " kabo " + cut
    r = await engine.complete(mid, "go", max_tokens=30)
    assert r.tool_calls == () and r.text == " kabo " + cut
    assert r.finish_reason == "length"


async def test_a_tool_call_payload_uses_the_requests_own_sampler(
    engine: erllama.Engine,
) -> None:
    ctl = StubControl()
    markers = erllama.ToolCallMarkers(
        start="<tool_call>", end="</tool_call>", payload_start="<arg>", payload_end="</arg>"
    )
    config = attrs_evolve(
        stub_config(control=ctl, script="<tool_call> x <arg> kabo rite </arg> y </tool_call>"),
        tool_call_markers=markers,
    )
    mid = await engine.load_model("m", config)
    r = await engine.complete(mid, "go", max_tokens=200, temperature=0.7)
    assert r.tool_calls == ("<tool_call> x <arg> kabo rite </arg> y </tool_call>",)
    greedy = [op.greedy for ops in ctl.history for op in ops if isinstance(op, Decode)]
    # syntax greedy, payload not, syntax greedy again
    assert True in greedy and greedy.count(False) > 1


async def test_done_carries_the_exact_reply_text_and_model_info_the_markers(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", tool_model(script=SCRIPT))
    r = await engine.infer(mid, "go", max_tokens=200, stop=["rite"])
    events = await events_of(r)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.reply_text == pieces(done.token_ids).decode()  # the stop string included
    assert "rite" in done.reply_text and "rite" not in texts(events, Token)
    info = engine.model_info(mid)
    assert info.tool_call_markers == ("<tool_call>", "</tool_call>")
    assert info.thinking_markers is None


async def test_a_loading_model_is_listed_as_loading(engine: erllama.Engine) -> None:
    import threading

    import anyio

    gate = threading.Event()
    ctl = StubControl(load_gate=gate)

    async def load() -> None:
        await engine.load_model("slow", stub_config(control=ctl))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await wait_for(lambda: ctl.waiting == 1)  # the load is parked on the model thread
        assert [m.id for m in engine.list_models()] == ["slow"]
        assert engine.status("slow") == "loading"
        assert engine.model_info("slow").status == "loading"
        gate.set()
    assert engine.status("slow") == "idle"
