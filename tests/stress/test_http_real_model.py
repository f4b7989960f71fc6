"""The hostile requests that mattered on a real model, over HTTP to ``erllama serve`` on
SmolLM2 (asyncio and trio).

Found by a black-box attack (issue 24): ``response_format`` with the pattern
``^(a{0,512}){0,512}$`` made SmolLM2's grammar sampler run forever (a disconnect did not
cancel it, /health said ok, SIGTERM waited; ``(a{0,128}){0,128}`` took 41 s); a lone
surrogate in a tool description was a 503 (llama.cpp's tokenizer failed on it); a flood of
special-token text kept the tokenizer busy for minutes. Each is now refused with a 400
naming the field, or bounded while running, and the model serves on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import httpx
import pytest

import erllama
from erllama.bundled import bundled_model_path
from erllama.server import ServeConfig, ServerConfig

from ..server.conftest import Server, running_server
from .conftest import record

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

FILE = "http real model"


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
async def smol_server(anyio_backend: str) -> AsyncIterator[Server]:
    path = bundled_model_path()
    if path is None:
        pytest.fail("SmolLM2 is not installed; run scripts/setup.sh")
    smol = erllama.ModelConfig(model_path=path, n_ctx=2048, n_batch=256, n_threads=2)
    strict = attrs.evolve(smol, options={"grammar_step_limit_s": 0.02})
    config = ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_body_bytes=4 * 2**20),
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        models={"smol": smol, "strict": strict},
    )
    registry = erllama.make_backend_registry()
    async with running_server(config, registry) as srv:
        yield srv


def chat(model: str = "smol", content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def pattern_format(pattern: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": pattern}
    return {"type": "json_schema", "json_schema": {"schema": schema}}


async def still_serves(h: httpx.AsyncClient) -> None:
    r = await h.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert r.status_code == 200, r.text
    assert (await h.get("/health")).json() == {"status": "ok"}


@pytest.mark.parametrize("pattern", ["^(a{0,512}){0,512}$", "^(a{0,128}){0,128}$"])
async def test_a_wedging_pattern_is_a_400_and_the_model_serves_on(
    smol_server: Server, pattern: str
) -> None:
    async with smol_server.http() as h:
        for stream in (False, True):
            with anyio.fail_after(30):  # refused before anything runs: no wait at all
                r = await h.post(
                    "/v1/chat/completions",
                    json=chat(response_format=pattern_format(pattern), stream=stream),
                )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "response_format"
        await still_serves(h)
        record(f"{FILE}: wedging patterns refused", 2)


async def test_a_grammar_slow_on_every_token_fails_at_the_step_limit(
    smol_server: Server,
) -> None:
    # Ambiguous but never empty: within the static bounds, ~0.1-0.5 s a token on SmolLM2;
    # "strict" allows 20 ms a step.
    body = chat(
        "strict",
        "Reply with the letter a repeated many times: " + "a" * 200,
        response_format=pattern_format("^(a|aa|aaa|aaaa){0,512}$"),
        max_tokens=64,
        # Greedy: sampled, the model sometimes closed the string after a few fast steps.
        temperature=0.0,
    )
    async with smol_server.http() as h:
        r = await h.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert "too costly" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "response_format"
        await still_serves(h)


async def test_bad_text_is_a_400_naming_the_field_not_a_503(smol_server: Server) -> None:
    tool = {"type": "function", "function": {"name": "f", "description": "x\ud800"}}
    flood = "<|im_start|>" * 20_000
    cases = [
        (chat(tools=[tool]), "tools[0].function.description"),
        (chat(content=flood), "messages"),
        (chat(content="hi") | {"messages": [{"role": "user", "content": "hi"}] * 5000}, "messages"),
    ]
    async with smol_server.http() as h:
        for body, param in cases:
            raw = json.dumps(body)
            r = await h.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert r.status_code == 400, (param, r.text[:300])
            assert param in r.json()["error"]["message"]
        await still_serves(h)
        record(f"{FILE}: bad text answered 400", len(cases))
