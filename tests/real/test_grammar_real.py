"""On SmolLM2: grammars that wedged llama.cpp's sampler are refused before they run, and a
grammar that is merely slow fails its request once one step exceeds the model's limit;
the model serves on either way.

Before these bounds, ``response_format`` with the pattern ``^(a{0,512}){0,512}$`` made one
request run forever (disconnects, cancels and SIGTERM all wait for the native step).
"""

from __future__ import annotations

import attrs
import pytest

import erllama

pytestmark = pytest.mark.anyio

PROMPT = "Reply with the letter a repeated many times: " + "a" * 200


async def still_serves(engine: erllama.Engine, mid: str) -> None:
    reply = await engine.complete(mid, "Say hi", max_tokens=3)
    assert reply.finish_reason == "length"


@pytest.mark.parametrize("pattern", ["^(a{0,512}){0,512}$", "^(a{0,128}){0,128}$"])
async def test_a_wedging_pattern_is_refused_before_it_runs(
    llama_engine: erllama.Engine, smol: str, pattern: str
) -> None:
    rf = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": pattern}}}
    with pytest.raises(erllama.InvalidRequest) as err:
        await llama_engine.chat(smol, [{"role": "user", "content": "hi"}], response_format=rf)
    assert err.value.param == "response_format.json_schema.schema"
    assert llama_engine.model_info(smol).queue_len == 0
    await still_serves(llama_engine, smol)


async def test_a_flat_schema_of_a_thousand_properties_runs(
    llama_engine: erllama.Engine, smol: str
) -> None:
    """It failed with "maximum recursion depth exceeded" (within the documented limits)."""
    properties = {f"p{i}": {"type": "integer"} for i in range(1000)}
    rf = {
        "type": "json_schema",
        "json_schema": {"schema": {"type": "object", "properties": properties}},
    }
    stream = await llama_engine.chat(
        smol, [{"role": "user", "content": "Give me a JSON object."}], response_format=rf,
        max_tokens=6,
    )  # fmt: skip
    reply = await stream.collect()
    assert reply.finish_reason in ("length", "stop") and reply.text.startswith("{")


async def test_a_wedging_raw_grammar_is_refused_before_it_runs(
    llama_engine: erllama.Engine, smol: str
) -> None:
    with pytest.raises(erllama.InvalidRequest) as err:
        await llama_engine.infer(smol, PROMPT, grammar='root ::= ("a"{0,2}){0,256}')
    assert err.value.param == "grammar"
    await still_serves(llama_engine, smol)


async def test_a_slow_grammar_fails_its_request_at_the_step_limit(
    llama_engine: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    # Ambiguous but never empty: within the static bounds, ~0.1-0.5 s a token on SmolLM2,
    # so a limit of 10 ms trips on its first steps.
    config = attrs.evolve(smol_config, options={"grammar_step_limit_s": 0.01})
    mid = await llama_engine.load_model("slowgrammar", config)
    grammar = 'root ::= ("a" | "aa" | "aaa" | "aaaa"){0,512}'
    with pytest.raises(erllama.InvalidRequest) as err:
        await llama_engine.complete(mid, PROMPT, grammar=grammar, max_tokens=64)
    assert err.value.param == "grammar" and "too costly" in err.value.reason
    await still_serves(llama_engine, mid)


async def test_a_bad_step_limit_is_a_config_error(
    llama_engine: erllama.Engine, smol_config: erllama.ModelConfig
) -> None:
    config = attrs.evolve(smol_config, options={"grammar_step_limit_s": 0})
    with pytest.raises(erllama.ConfigError) as err:
        await llama_engine.load_model("badlimit", config)
    assert "options.grammar_step_limit_s" in str(err.value)
