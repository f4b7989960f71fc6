"""Prefix summaries and the router's cost-based choice (no Ray)."""

from __future__ import annotations

import random

import pytest

import erllama
from erllama.cluster import (
    BLOCK,
    CostModel,
    PrefixSummary,
    ReplicaView,
    Router,
    chain_hashes,
    rank_replicas,
)
from erllama.cluster.prefixes import matched_blocks

from ..helpers import stub_config, words


def test_chains_agree_exactly_as_long_as_the_token_lists_do() -> None:
    rng = random.Random(1)
    base = [rng.randrange(50_000) for _ in range(5 * BLOCK + 10)]
    other = [*base[: 3 * BLOCK + 7], 1, *base[3 * BLOCK + 8 :]]
    a, b = chain_hashes(base), chain_hashes(other)
    assert len(a) == 5  # the partial last block is not hashed
    assert a[:3] == b[:3] and all(x != y for x, y in zip(a[3:], b[3:], strict=True))
    # The cache's u32 little-endian bytes hash the same as the ids.
    from erllama.cache.key import encode_tokens

    assert chain_hashes(encode_tokens(base)) == a


PROMPT = list(range(10 * BLOCK))
CHAIN = chain_hashes(PROMPT)
COST = CostModel(prefill_tok_per_s=200.0, request_s=1.0)


def test_a_summary_survives_the_wire_and_keeps_the_cheapest_tier() -> None:
    s = PrefixSummary()
    tokens = list(range(3 * BLOCK))
    s.add(tokens, "disk")
    s.add(tokens[: 2 * BLOCK], "ram")
    held = PrefixSummary.from_wire(s.to_wire())
    chain = chain_hashes(tokens)
    assert [held[h] for h in chain] == [0, 0, 2]
    assert matched_blocks(chain, held) == (3, 2)
    assert matched_blocks(chain_hashes([7, *tokens]), held) == (0, 0)


def test_a_summary_is_capped_most_recent_last() -> None:
    s = PrefixSummary(limit=4)
    s.add(list(range(3 * BLOCK)), "ram")
    s.add(list(range(1000, 1000 + 3 * BLOCK)), "ram")
    assert len(s.held) == 4
    assert chain_hashes(list(range(1000, 1000 + 3 * BLOCK)))[-1] in s.held


def view(rid: str, *, held: dict[int, int] | None = None, load: int = 0, cap: int = 4,
         sessions: frozenset[str] = frozenset()) -> ReplicaView:  # fmt: skip
    return ReplicaView.of(rid, held or {}, CHAIN, load=load, capacity=cap, sessions=sessions)


def best(replicas: list[ReplicaView], session: str | None = None) -> str:
    return rank_replicas(replicas, len(PROMPT), BLOCK, COST, session)[0].replica.id


def test_the_replica_holding_the_prefix_wins_over_an_idle_empty_one() -> None:
    holds = dict.fromkeys(CHAIN[:8], 0)
    assert best([view("empty"), view("warm", held=holds)]) == "warm"


def test_queued_work_outweighs_a_short_prefix() -> None:
    short = dict.fromkeys(CHAIN[:1], 0)  # 64 tokens saved: 0.3 s of prefill
    assert best([view("empty"), view("warm", held=short, load=2)]) == "empty"


def test_a_disk_prefix_is_credited_at_its_restore_cost() -> None:
    slow = CostModel(prefill_tok_per_s=200.0, restore_s_per_token=(0.0, 0.0, 1.0))
    on_disk = dict.fromkeys(CHAIN, 2)
    ranked = rank_replicas([view("disk", held=on_disk), view("empty")], len(PROMPT), BLOCK, slow)
    assert ranked[0].replica.id == "empty"


def test_a_full_replica_is_passed_over_and_all_full_means_least_loaded() -> None:
    holds = dict.fromkeys(CHAIN, 0)
    assert best([view("warm", held=holds, load=4), view("empty", load=1)]) == "empty"
    assert best([view("a", load=6), view("b", load=5), view("warm", held=holds, load=9)]) == "b"


def test_a_session_goes_to_its_replica_while_it_has_room() -> None:
    holds = dict.fromkeys(CHAIN, 0)
    mine = frozenset({"s1"})
    assert best([view("warm", held=holds), view("home", sessions=mine, load=3)], "s1") == "home"
    assert best([view("warm", held=holds), view("home", sessions=mine, load=4)], "s1") == "warm"


@pytest.mark.anyio
async def test_an_engine_reports_what_it_holds(cached_engine: erllama.Engine) -> None:
    mid = await cached_engine.load_model("m", stub_config(n_ctx=2048))
    prompt = await cached_engine.tokenize(mid, words(3 * BLOCK + 5))
    r = await cached_engine.complete(mid, prompt, max_tokens=4)
    summary = cached_engine.prefix_summary(mid)
    held = PrefixSummary.from_wire(summary.to_wire())
    n, rank = matched_blocks(chain_hashes([*r.context_tokens, 9, 9]), held)
    assert n == len(r.context_tokens) // BLOCK and rank == 0
    other = chain_hashes(await cached_engine.tokenize(mid, words(3 * BLOCK, 900)))
    assert matched_blocks(other, held)[0] == 0


def test_the_directory_router_agrees_with_scoring_every_replica() -> None:
    rng = random.Random(7)
    router = Router(COST, BLOCK)
    views = []
    for i in range(40):
        held: dict[int, int] = {}
        depth = rng.randrange(0, 11)
        for h in CHAIN[:depth]:
            held[h] = rng.randrange(3)
        for _ in range(rng.randrange(3)):  # other prompts it holds
            for h in chain_hashes([rng.randrange(9999) for _ in range(3 * BLOCK)]):
                held[h] = 0
        load = rng.randrange(6)
        router.update(f"r{i}", held=held, load=load, capacity=4)
        views.append(view(f"r{i}", held=held, load=load))
    fast = router.rank(CHAIN, len(PROMPT))
    slow = rank_replicas(views, len(PROMPT), BLOCK, COST)
    assert fast[0].replica.id == slow[0].replica.id
    assert fast[0].matched_tokens == slow[0].matched_tokens
    # It scored only those that hold the prompt, and the least loaded of the rest.
    holders = {v.id for v in views if v.blocks}
    assert holders <= {s.replica.id for s in fast} and len(fast) <= len(holders) + 1
    assert sorted(router.fallback()) == sorted(v.id for v in views)


def test_the_directory_forgets_what_a_replica_no_longer_holds() -> None:
    router = Router(COST, BLOCK)
    router.update("a", held=dict.fromkeys(CHAIN, 0), load=0, capacity=4)
    router.update("b", held={}, load=1, capacity=4)
    assert router.rank(CHAIN, len(PROMPT))[0].replica.id == "a"
    router.update("a", held={}, load=0)  # evicted
    assert router.directory.matches(CHAIN) == {}
    assert router.rank(CHAIN, len(PROMPT))[0].matched_tokens == 0
