"""``cache_salt``: only requests with the same salt share cached KV, rows and live alike.

A server gives each API key its own salt: without it, a tenant could recover another's
prompt token by token from how many of its guessed tokens came back cached.
"""

from __future__ import annotations

import pytest

import erllama
from erllama import InvalidRequest
from erllama.cache.key import salted
from erllama.plugins import BackendRegistry

from .helpers import stub_config

pytestmark = pytest.mark.anyio

PROMPT = "the secret plans of tenant a for the next quarter"


def test_salted_is_the_fingerprint_without_a_salt_and_differs_per_salt() -> None:
    fp = bytes(32)
    assert salted(fp, None) == fp
    assert salted(fp, "a") != fp
    assert salted(fp, "a") != salted(fp, "b")
    assert salted(fp, "a") == salted(fp, "a")
    assert len(salted(fp, "a")) == 32


async def test_live_kv_is_reused_only_under_the_same_salt(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(n_seq_max=1))
    prompt = await engine.tokenize(mid, PROMPT)
    first = await engine.complete(mid, prompt, max_tokens=2, cache_salt="a")
    assert first.cache_hit_kind == "cold"
    # The sequence holds tenant a's KV: b gets nothing from it, whatever it guesses.
    other = await engine.complete(mid, prompt, max_tokens=2, cache_salt="b")
    assert other.cache_hit_kind == "cold" and other.cache_delta.read == 0
    unsalted = await engine.complete(mid, prompt, max_tokens=2)
    assert unsalted.cache_hit_kind == "cold"
    # b's KV is now live: b's own next request reuses it.
    again = await engine.complete(mid, prompt, max_tokens=2)
    assert again.cache_hit_kind != "cold" and again.cache_delta.read > 0


async def test_cache_rows_are_found_only_under_the_same_salt(
    cache_config: erllama.EngineConfig, registry: BackendRegistry
) -> None:
    async with erllama.open_engine(cache_config, backends=registry) as engine:
        # No live reuse: every hit below comes from a cache row.
        mid = await engine.load_model("m", stub_config(keep_live_kv=False))
        prompt = await engine.tokenize(mid, PROMPT * 4)
        key = await engine.prefill_only(mid, prompt, cache_salt="a")
        assert key is not None
        probe_a = await engine.longest_cached_prefix(mid, prompt, cache_salt="a")
        probe_b = await engine.longest_cached_prefix(mid, prompt, cache_salt="b")
        assert probe_a.tokens == len(prompt) and probe_b.tokens == 0
        # Not even when b names a's row as the one to resume from.
        b = await engine.complete(mid, prompt, max_tokens=1, cache_salt="b", parent_key=key)
        assert b.cache_hit_kind == "cold" and b.cache_delta.read == 0
        a = await engine.complete(mid, prompt, max_tokens=1, cache_salt="a")
        assert a.cache_hit_kind == "exact"


@pytest.mark.parametrize("salt", ["", 7, "x" * 1025, "\ud800"])
async def test_a_bad_salt_is_refused_naming_it(engine: erllama.Engine, salt: object) -> None:
    mid = await engine.load_model("m", stub_config())
    with pytest.raises(InvalidRequest) as err:
        await engine.infer(mid, "hello", cache_salt=salt)  # type: ignore[arg-type]
    assert err.value.param == "cache_salt"
