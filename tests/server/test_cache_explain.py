"""``erllama.explain_cache`` on every dialect, and ``/metrics`` counting misses by cause.

The server here has a cache (the shared module server has none). Each test sends a prompt
twice under a cache salt of its own (nothing any other test left can explain its misses):
the first finds no row; the second shares the first's opening words, then differs.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest

import erllama
from erllama.plugins import BackendRegistry

from ..helpers import stub_config, wait_for
from .conftest import PLAIN_SCRIPT, Server, running_server, serve_config

pytestmark = pytest.mark.anyio

EXPLAIN = {"explain_cache": True}
_salts = itertools.count()


@pytest.fixture(scope="module")
async def server(anyio_backend: str, stub_registry: BackendRegistry) -> AsyncIterator[Server]:
    config = attrs.evolve(
        serve_config(),
        cache=erllama.CacheConfig(
            ram_file_dir=None, policy=erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000)
        ),
        # Rows only: every warm start is a cache row, so the nearest row is the first turn's.
        models={"plain": stub_config(script=PLAIN_SCRIPT, keep_live_kv=False)},
    )
    async with running_server(config, stub_registry) as srv:
        yield srv


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "plain", "messages": [{"role": "user", "content": text}], **extra}


#: Each dialect: route, a request body for a text, and where its ``erllama`` field is.
Dialect = tuple[str, Callable[..., dict[str, Any]], Callable[[dict[str, Any]], dict[str, Any]]]
DIALECTS: dict[str, Dialect] = {
    "openai": ("/v1/chat/completions", lambda t, **x: chat(t, max_tokens=8, **x), lambda r: r),
    "completions": (
        "/v1/completions",
        lambda t, **x: {"model": "plain", "prompt": t, "max_tokens": 8, **x},
        lambda r: r,
    ),
    "anthropic": ("/v1/messages", lambda t, **x: chat(t, max_tokens=8, **x), lambda r: r),
    "responses": (
        "/v1/responses",
        lambda t, **x: {"model": "plain", "input": t, "max_output_tokens": 8, **x},
        lambda r: r,
    ),
    "ollama": ("/api/chat", lambda t, **x: chat(t, stream=False, **x), lambda r: r),
}


async def post(server: Server, route: str, body: dict[str, Any]) -> dict[str, Any]:
    async with server.http() as h:
        r = await h.post(route, json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_each_dialect_explains_a_miss_only_when_asked(server: Server, dialect: str) -> None:
    route, body, field = DIALECTS[dialect]
    salt = f"explain-{dialect}-{next(_salts)}"
    first = field(
        await post(server, route, body("kabo rite sanu mila lopa dada sanu mila", cache_salt=salt))
    )
    assert "explain" not in first["erllama"]["cache"]  # not asked
    asked = body("kabo rite sanu mila lopa dada tove tove", cache_salt=salt, erllama=EXPLAIN)
    out = field(await post(server, route, asked))["erllama"]["cache"]
    ex = out["explain"]
    assert ex["cause"] == "diverged"
    # The prompt left the first turn's row right after "lopa dada", and all it shared was
    # restored (the stub computes every cell exactly: a grid of 1).
    assert ex["position"] == ex["matched"] == ex["restored"] == out["tokens_restored"] > 0
    assert ex["shared_text"].split()[-2:] == ["lopa", "dada"]
    assert ex["prompt_text"].split()[0] == "tove"
    assert ex["row_text"].split()[0] == "sanu"
    assert ex["tier"] == ex["row_tier"] == "ram" and ex["grid"] == 1
    assert ex["prompt_ids"][0] != ex["row_ids"][0]


async def test_a_first_prompt_under_a_fresh_salt_finds_no_row(server: Server) -> None:
    salt = f"fresh-{next(_salts)}"
    out = await post(
        server, "/v1/chat/completions", chat("dada kabo", erllama=EXPLAIN, cache_salt=salt)
    )
    ex = out["erllama"]["cache"]["explain"]
    assert (ex["cause"], ex["matched"], ex["restored"], ex["position"]) == ("no_row", 0, 0, None)


async def test_a_bad_explain_flag_is_a_400_naming_it(server: Server) -> None:
    async with server.http() as h:
        r = await h.post("/v1/chat/completions", json=chat("x", erllama={"explain_cache": "yes"}))
        a = await h.post("/v1/messages", json=chat("x", max_tokens=8, erllama={"explain_cache": 1}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "erllama.explain_cache"
    assert a.status_code == 400 and "explain_cache" in a.json()["error"]["message"]


async def test_metrics_count_misses_by_cause(server: Server) -> None:
    def text() -> str:
        return server.state.metrics.exposition("")[0].decode()

    def count(cause: str) -> float:
        line = f'erllama_cache_misses_by_cause_total{{cause="{cause}",model="plain"}} '
        for row in text().splitlines():
            if row.startswith(line):
                return float(row[len(line) :])
        return 0.0

    before = {c: count(c) for c in ("no_row", "diverged")}
    salt = f"metrics-{next(_salts)}"
    await post(server, "/v1/chat/completions", chat("dede kabo rite sanu mila", cache_salt=salt))
    await post(server, "/v1/chat/completions", chat("dede kabo rite sanu tove", cache_salt=salt))
    await post(server, "/v1/chat/completions", chat("dede kabo rite sanu tove", cache_salt=salt))
    # Counted when the request ends, maybe after the client has its response.
    await wait_for(lambda: count("diverged") == before["diverged"] + 1)
    assert count("no_row") == before["no_row"] + 1  # the exact resend is no miss
