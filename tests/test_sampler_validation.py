"""Sampler arguments are validated at admission and rejected with the parameter's name."""

from __future__ import annotations

import math

import pytest

import erllama

from .helpers import stub_config

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("temperature", 1e308),  # passes a plain "finite" check, overflows a sampler
        ("repetition_penalty", 1e308),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.2),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", True),
        ("max_tokens", 0),
        ("max_tokens", "10"),
        ("grammar", ""),
        ("parent_key", "not-hex"),
        ("presence_penalty", 2.5),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -3),
        ("penalty_last_n", -2),
        ("penalty_last_n", 1.5),
        ("logit_bias", [1, 2]),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {"-1": 1.0}),
        ("logit_bias", {10**9: 1.0}),  # outside the vocabulary
        ("logit_bias[5]", {5: 101.0}),
        ("logit_bias[5]", {"5": math.inf}),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", True),
    ],
)
async def test_out_of_range_values_raise_invalid_request_naming_the_parameter(
    engine: erllama.Engine, param: str, value: object
) -> None:
    mid = await engine.load_model("m", stub_config())
    keyword = param.split("[")[0]
    with pytest.raises(erllama.InvalidRequest) as exc:
        await engine.infer(mid, "hello", **{keyword: value})  # type: ignore[arg-type]
    assert exc.value.param == param
    assert engine.model_info(mid).queue_len == 0
    assert (await engine.complete(mid, "hello", max_tokens=1)).token_ids


async def test_bad_grammar_is_rejected_before_anything_runs(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    with pytest.raises(erllama.InvalidRequest) as exc:
        await engine.infer(mid, "hello", grammar="root ::= (unclosed")
    assert exc.value.param == "grammar"
    with pytest.raises(erllama.InvalidRequest):
        await engine.infer(mid, "hello", grammar='answer ::= "x"')  # no root rule


async def test_prompt_problems_are_invalid_requests(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(n_ctx=64))
    for prompt in ([], [-1], [10**9], "word " * 100, [True], b"bytes"):
        with pytest.raises(erllama.InvalidRequest) as exc:
            await engine.infer(mid, prompt)  # type: ignore[arg-type]
        assert exc.value.param == "prompt"


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda e, m: e.infer(m, "bad \ud800 text"), "prompt"),
        (lambda e, m: e.tokenize(m, "bad \ud800 text"), "text"),
        (
            lambda e, m: e.apply_chat_template(m, [{"role": "user", "content": "x \ud800"}]),
            "messages[0].content",
        ),
        (
            lambda e, m: e.apply_chat_template(m, [{"role": "user", "content": "x"}], "\udfff"),
            "system",
        ),
    ],
)
async def test_text_that_is_not_valid_unicode_is_a_bad_request(
    engine: erllama.Engine, call: object, param: str
) -> None:
    mid = await engine.load_model("m", stub_config())
    with pytest.raises(erllama.InvalidRequest) as exc:
        await call(engine, mid)  # type: ignore[operator]
    assert exc.value.param == param
    assert (await engine.complete(mid, "still serving", max_tokens=2)).token_ids


async def test_a_logit_bias_bans_and_forces_tokens(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    plain = await engine.complete(mid, "hello there", max_tokens=6)
    banned = await engine.complete(
        mid, "hello there", max_tokens=6, logit_bias={plain.token_ids[0]: -100}
    )
    assert banned.token_ids[0] != plain.token_ids[0]
    assert plain.token_ids[0] not in banned.token_ids
    forced = await engine.complete(
        mid, "hello there", max_tokens=3, logit_bias={str(plain.token_ids[2]): 100}
    )
    assert forced.token_ids == (plain.token_ids[2],) * 3


async def test_logprobs_come_with_each_answer_token(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    plain = await engine.complete(mid, "hello there", max_tokens=5)
    done = await engine.complete(mid, "hello there", max_tokens=5, logprobs=3)
    assert done.token_ids == plain.token_ids  # asking for them changes nothing else
    assert [lp.token_id for lp, _ in done.logprobs] == list(done.token_ids)
    for lp, top in done.logprobs:
        assert lp.logprob <= 0 and len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token_id == lp.token_id  # the stub ranks its pick first
    stream = await engine.infer(mid, "hello there", max_tokens=5)
    tokens = [ev async for ev in stream if isinstance(ev, erllama.Token)]
    assert tokens and all(t.logprob is None and t.top_logprobs == () for t in tokens)
