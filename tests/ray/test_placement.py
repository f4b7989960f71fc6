"""The placement decision and the transfer policy, without Ray: what the router does with
the replicas' reports, its own sends and Serve's queue lengths."""

from __future__ import annotations

from typing import Any

import pytest

from erllama.cluster import BLOCK, CostModel, PrefixSummary, chain_hashes
from erllama.ray.placement import PROVISIONAL_S, FetchCost, Placement
from erllama.ray.transfer import TransferPolicy
from erllama.ray.wire import GenerateRequest

PROMPT = list(range(1, 6 * BLOCK + 1))
COST = CostModel(prefill_tok_per_s=1000.0, request_s=5.0)
REPLICAS = ["a", "b", "c"]
IDLE: dict[str, int | None] = dict.fromkeys(REPLICAS, 0)


def report(tokens: list[int] | None = None, *, load: int = 0, sessions: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    summary = PrefixSummary()
    if tokens:
        summary.add(tokens, "ram")
    entry: dict[str, Any] = summary.to_wire()
    if sessions:
        entry["sessions"] = list(sessions)
    return {"load": load, "models": {"m": entry}}


def req(tokens: list[int] = PROMPT, session: str | None = None) -> GenerateRequest:
    return GenerateRequest(
        model="m", tokens=tuple(tokens), chain=tuple(chain_hashes(tokens)), session_id=session
    )


def placement(**reports: dict[str, Any]) -> Placement:
    p = Placement(COST)
    for replica in REPLICAS:
        p.report(replica, reports.get(replica, report()), capacity=4)
    return p


def first(p: Placement, request: GenerateRequest, loads: dict[str, int | None] = IDLE) -> str:
    return p.order(request, REPLICAS, loads)[0][0]


def test_the_replica_holding_the_longest_prefix_goes_first() -> None:
    p = placement(b=report(PROMPT[: 2 * BLOCK]), c=report(PROMPT[: 5 * BLOCK]))
    groups = p.order(req(), REPLICAS, IDLE)
    assert groups[0] == ["c"] and groups[1] == ["b"]
    assert sorted(r for g in groups for r in g) == REPLICAS  # everyone is in some group


def test_the_request_carries_who_holds_how_much() -> None:
    p = placement(b=report(PROMPT[: 2 * BLOCK]), c=report(PROMPT))
    request = req()
    p.order(request, REPLICAS, IDLE)
    assert request.holders == {"b": 2 * BLOCK, "c": len(PROMPT) - 1}


def test_a_busy_holder_loses_to_an_idle_replica() -> None:
    p = placement(c=report(PROMPT))
    assert first(p, req(), {"a": 0, "b": 0, "c": 1}) != "c"  # 5 s of queue vs 0.4 s prefill
    assert first(p, req(), IDLE) == "c"


def test_counting_fetches_an_idle_replica_beats_a_holder_sooner() -> None:
    cost = CostModel(prefill_tok_per_s=100.0, request_s=1.0)  # the prompt: 3.8 s to prefill
    loads: dict[str, int | None] = {"a": 0, "b": 0, "c": 2}
    without = Placement(cost)
    with_fetch = Placement(cost, fetch=FetchCost(s_per_token=1e-4))
    for p in (without, with_fetch):
        for replica in REPLICAS:
            p.report(replica, report(PROMPT) if replica == "c" else report(), capacity=4)
    assert without.order(req(), REPLICAS, loads)[0] == ["c"]  # 2 s of queue < 3.8 s
    assert with_fetch.order(req(), REPLICAS, loads)[0] != ["c"]  # a fetch: 0.06 s


def test_counted_in_seconds_a_long_queue_outweighs_a_longer_one_of_short_requests() -> None:
    now = [0.0]
    p = Placement(COST, decode_tok_per_s=100.0, clock=lambda: now[0])
    for replica in REPLICAS:
        p.report(replica, report(), capacity=8)
    cold = req(list(range(10_000, 10_000 + 8 * BLOCK)))  # 512 tokens to prefill: 0.512 s
    cold.options["max_tokens"] = 500  # and 5 s of reply
    p.sent("a", cold, "r1")
    for i in range(2):  # two short ones on b: 0.06 s each
        short = req(list(range(20_000 + 100 * i, 20_000 + 100 * i + 10)))
        short.options["max_tokens"] = 5
        p.sent("b", short, f"r{2 + i}")
    assert p.queue_s("a", 1) == pytest.approx(5.512)
    assert p.queue_s("b", 2) == pytest.approx(0.12)
    loads: dict[str, int | None] = {"a": 1, "b": 2, "c": 3}
    assert p.order(req(), REPLICAS, loads)[0] == ["b"]  # by count, a would win
    now[0] = 1.0
    assert p.queue_s("a", 1) == pytest.approx(4.512)  # time passes, work gets done
    p.completed("a", "r1")
    assert p.queue_s("a", 0) == 0.0


def test_a_full_holder_goes_last() -> None:
    p = placement(c=report(PROMPT))
    groups = p.order(req(), REPLICAS, {"a": 4, "b": 1, "c": 4})
    # b has room; c holds the prefix but is full, so it ranks after b; a (full, holding
    # nothing) is left for the rest.
    assert groups == [["b"], ["c"], ["a"]]


def test_without_serve_estimates_the_reported_load_counts() -> None:
    p = placement(c=report(PROMPT, load=3))
    assert first(p, req(), dict.fromkeys(REPLICAS)) != "c"


def test_what_was_sent_counts_until_the_replica_has_reported_twice() -> None:
    p = placement()
    p.sent("b", req())  # b now holds the prompt, as far as the router knows
    follow = req([*PROMPT, 7, 8, 9])
    assert first(p, follow) == "b"
    # b's next report may have been taken before the request got there: still credited.
    p.report("b", report(load=1), capacity=4)
    assert first(p, follow) == "b"
    p.report("b", report(load=0), capacity=4)  # the one after says it holds nothing
    assert first(p, follow) == "a"


def test_only_reported_prefixes_are_offered_for_fetching() -> None:
    p = placement(a=report(PROMPT[: 3 * BLOCK]))
    p.sent("b", req())  # b may still be prefilling it: nothing to fetch there yet
    follow = req([*PROMPT, 7])
    p.order(follow, REPLICAS, IDLE)
    assert follow.holders == {"a": 3 * BLOCK}


def test_an_unchanged_report_does_not_erase_what_was_sent() -> None:
    same = report()
    p = placement(b=same)
    p.sent("b", req())
    p.report("b", dict(same), capacity=4)  # Serve re-sends every replica's stats
    follow = req([*PROMPT, 7])
    assert first(p, follow) == "b"


def test_an_eviction_report_moves_the_prefix_elsewhere() -> None:
    p = placement(a=report(PROMPT), b=report(PROMPT[: 2 * BLOCK]))
    assert first(p, req()) == "a"
    p.report("a", report(), capacity=4)  # a evicted its rows
    assert first(p, req()) == "b"


def test_a_session_goes_to_the_replica_that_reports_it() -> None:
    p = placement(c=report(sessions=("s1",)), a=report(PROMPT))
    assert first(p, req(session="s1")) == "c"  # even though a holds the prompt


def test_a_session_sent_before_any_report_sticks() -> None:
    p = placement(a=report(PROMPT))
    p.sent("b", req([1, 2, 3], session="s2"))
    assert first(p, req(session="s2")) == "b"


def test_replicas_that_left_are_forgotten() -> None:
    p = placement(c=report(PROMPT))
    p.keep_only(["a", "b"])
    groups = p.order(req(), ["a", "b"], {"a": 0, "b": 0})
    assert "c" not in [r for g in groups for r in g]


def test_a_model_no_replica_reported_goes_to_the_least_loaded() -> None:
    p = placement()
    other = GenerateRequest(model="other", tokens=(1, 2, 3), chain=())
    assert p.order(other, REPLICAS, {"a": 2, "b": 0, "c": 1})[0] == ["b"]


# ---- choices Serve has not confirmed yet ----------------------------------------------------


def clocked(**kwargs: Any) -> tuple[Placement, list[float]]:
    now = [0.0]
    p = Placement(COST, clock=lambda: now[0], **kwargs)
    for replica in REPLICAS:
        p.report(replica, report(), capacity=4)
    return p, now


def test_a_choice_counts_before_serve_confirms_it() -> None:
    p, _ = clocked()
    cold = req(list(range(30_000, 30_000 + 3 * BLOCK)))
    chosen = first(p, cold)
    p.chose(chosen, cold, "r1")
    # Serve's estimates still say everyone is idle: the choice alone moves the next one.
    other = req(list(range(40_000, 40_000 + 3 * BLOCK)))
    assert first(p, other) != chosen
    # And the prompt is credited there (its next turn may follow it), not offered for
    # fetching: it is not even sent yet.
    assert set(p._router("m").directory.matches(cold.chain)) == {chosen}
    follow = req([*cold.tokens, 7])
    p.order(follow, REPLICAS, IDLE)
    assert follow.holders == {}


def test_a_confirmed_choice_counts_once() -> None:
    p, _ = clocked(decode_tok_per_s=100.0)
    r = req()
    r.options["max_tokens"] = 100  # 0.384 s of prefill, then 1 s of reply
    p.chose("a", r, "r1")
    p.sent("a", r, "r1")
    assert p.queue_s("a", 1) == pytest.approx(1.384)
    p.completed("a", "r1")
    assert p.queue_s("a", 0) == 0.0


def test_a_choice_serve_has_sent_is_not_counted_twice() -> None:
    p, _ = clocked()
    p.chose("a", req(), "r1")
    other = req(list(range(40_000, 40_000 + BLOCK)))
    p.order(other, REPLICAS, {"a": 0, "b": 0, "c": 0})
    assert p._router("m").load("a") == 1  # Serve does not count it yet: the choice does
    p.counted_by_serve("a")  # Serve sent it, and counts it from now on
    p.order(other, REPLICAS, {"a": 1, "b": 0, "c": 0})
    assert p._router("m").load("a") == 1


def test_a_choice_serve_never_sends_is_forgotten() -> None:
    p, now = clocked(decode_tok_per_s=100.0)
    r = req()
    r.options["max_tokens"] = 100
    p.chose("a", r, "r1")
    assert p.queue_s("a", 0) == pytest.approx(1.384)
    now[0] = PROVISIONAL_S
    follow = req([*PROMPT, 7])
    p.order(follow, REPLICAS, IDLE)  # expires it
    assert p.queue_s("a", 0) == 0.0
    assert p._router("m").directory.matches(follow.chain) == {}  # no longer credited


def test_a_choice_sent_elsewhere_moves_there() -> None:
    p, _ = clocked(decode_tok_per_s=100.0)
    r = req()
    r.options["max_tokens"] = 100
    p.chose("a", r, "r1")
    p.sent("b", r, "r1")  # a was full when Serve came to it
    assert p.queue_s("a", 0) == 0.0
    assert p.queue_s("b", 1) == pytest.approx(1.384)
    assert set(p._router("m").directory.matches(r.chain)) == {"b"}


def test_choosing_again_for_a_request_replaces_the_earlier_choice() -> None:
    p, _ = clocked(decode_tok_per_s=100.0)
    r = req()
    r.options["max_tokens"] = 100
    p.chose("a", r, "r1")
    p.chose("c", r, "r1")  # Serve retried: the choice moved
    assert p.queue_s("a", 0) == 0.0
    assert p.queue_s("c", 0) == pytest.approx(1.384)


# ---- prefixes still being prefilled ---------------------------------------------------------


def test_a_prompt_sent_but_not_reported_is_offered_as_filling() -> None:
    cost = CostModel(prefill_tok_per_s=100.0, request_s=5.0)  # the prompt: 3.84 s
    now = [0.0]
    p = Placement(cost, decode_tok_per_s=100.0, clock=lambda: now[0])
    for replica in REPLICAS:
        p.report(replica, report(), capacity=4)
    r = req()
    r.options["max_tokens"] = 100
    p.sent("a", r, "r1")
    now[0] = 2.0
    follow = req([*PROMPT, 7])
    p.order(follow, REPLICAS, IDLE)
    assert follow.holders == {}
    assert follow.filling["a"] == (len(PROMPT), pytest.approx(1.84))
    p.report("a", report(PROMPT, load=1), capacity=4)  # a reports it: fetchable now
    p.order(follow, REPLICAS, IDLE)
    assert follow.holders == {"a": len(PROMPT)}
    assert follow.filling == {}


def test_a_replica_that_can_wait_for_the_row_beats_a_holder_busy_after_its_prefill() -> None:
    cost = CostModel(prefill_tok_per_s=100.0, request_s=5.0)
    follow = req([*PROMPT, 7])
    firsts = []
    for fetch in (None, FetchCost(s_per_token=1e-4)):
        now = [0.0]
        p = Placement(cost, fetch=fetch, decode_tok_per_s=100.0, clock=lambda now=now: now[0])
        for replica in REPLICAS:
            p.report(replica, report(), capacity=4)
        r = req()
        r.options["max_tokens"] = 100  # a: 3.84 s of prefill, then 1 s of reply
        p.sent("a", r, "r1")
        now[0] = 2.0
        firsts.append(first(p, follow, {"a": 1, "b": 0, "c": 0}))
    # Prefilling elsewhere (3.85 s) loses to queueing on a (2.85 s); waiting 1.84 s for a's
    # row and fetching it beats both.
    assert firsts[0] == "a" and firsts[1] != "a"


def test_waiting_for_a_row_pays_when_it_arrives_before_the_prefill_it_saves() -> None:
    policy = TransferPolicy(prefill_tok_per_s=100.0, bytes_per_token=8)  # 1,000 tokens: 10 s
    best = policy.best_filling({"x": (1000, 4.0), "y": (1000, 2.0)}, "me", 0)
    assert best is not None
    replica, tokens, wait_s, saves = best
    assert (replica, tokens) == ("y", 1000)  # the sooner one
    assert saves == pytest.approx(10.0 - 0.02 - 2.0, abs=0.01)
    assert 2.0 < wait_s < 10.0  # some slack past the expected time, less than the prefill
    assert policy.best_filling({"x": (1000, 11.0)}, "me", 0) is None  # later than prefilling
    assert policy.best_filling({"me": (1000, 0.0)}, "me", 0) is None


# ---- the transfer policy ------------------------------------------------------------------


def test_a_fetch_is_worth_it_when_it_beats_the_prefill_it_saves() -> None:
    policy = TransferPolicy(
        prefill_tok_per_s=400.0, bandwidth_bytes_per_s=100e6, bytes_per_token=32 * 1024
    )
    # 1,000 tokens: 0.02 s + 0.33 s to move, 2.5 s to prefill.
    assert policy.worth_it(own_tokens=0, holder_tokens=1000)
    # Only 100 tokens saved, but the whole 1,000-token row moves.
    assert not policy.worth_it(own_tokens=900, holder_tokens=1000)
    assert not policy.worth_it(own_tokens=0, holder_tokens=32)  # below a block


def test_the_policy_learns_bandwidth_bytes_per_token_and_prefill_rate() -> None:
    policy = TransferPolicy(weight=1.0)
    policy.moved(n_bytes=10_000_000, n_tokens=1000, seconds=0.1)
    assert policy.bandwidth_bytes_per_s == pytest.approx(1e8)
    assert policy.bytes_per_token == pytest.approx(10_000)
    policy.prefilled(n_tokens=800, seconds=2.0)
    assert policy.prefill_tok_per_s == pytest.approx(400)
    policy.rows_held(n_bytes=1, n_tokens=1000)  # measured transfers outrank own rows
    assert policy.bytes_per_token == pytest.approx(10_000)


def test_the_default_is_conservative_until_rows_are_seen() -> None:
    policy = TransferPolicy(prefill_tok_per_s=400.0)
    assert not policy.worth_it(own_tokens=0, holder_tokens=1000)  # 256 KiB a token, 50 MB/s
    policy.rows_held(n_bytes=4_000_000, n_tokens=1000)  # this replica's rows: 4 KB a token
    assert policy.worth_it(own_tokens=0, holder_tokens=1000)


def test_the_best_holder_is_the_longest_other_one() -> None:
    policy = TransferPolicy(bytes_per_token=8, prefill_tok_per_s=100.0)
    assert policy.best_holder({"me": 900, "x": 500, "y": 700}, "me", 0) == ("y", 700)
    assert policy.best_holder({"me": 900}, "me", 0) is None


def test_a_report_newer_than_serves_estimate_says_how_loaded_a_replica_is() -> None:
    # Serve's estimate can stay wrong high for its whole life: a replica answering a send
    # counts a request that has just ended. The holder's report (taken after it saved the
    # prompt's rows, so after the request ended) says it is idle.
    now = [0.0]
    p = Placement(COST, clock=lambda: now[0])
    for replica in REPLICAS:
        p.report(replica, report(), capacity=4)
    busy: dict[str, int | None] = {"a": 0, "b": 0, "c": 1}
    p.serve_estimate_changed("c")
    now[0] = 1.0
    p.report("c", report(PROMPT), capacity=4)
    assert first(p, req(), busy) == "c"
    # The other way round, Serve's estimate is the newer, and counts.
    now[0] = 2.0
    p.serve_estimate_changed("c")
    assert first(p, req(), busy) != "c"


def test_once_serves_estimate_has_expired_the_report_counts_again() -> None:
    p = placement(c=report(PROMPT))
    assert first(p, req(), {"a": 0, "b": 0, "c": 1}) != "c"
    # The estimate expired (None); c's report, unchanged, says it is idle.
    assert first(p, req(), {"a": 0, "b": 0, "c": None}) == "c"


def test_without_an_estimate_what_the_router_sent_and_has_not_seen_end_counts() -> None:
    p = placement(c=report(PROMPT))
    unknown: dict[str, int | None] = dict.fromkeys(REPLICAS)
    for i in range(2):
        p.sent("c", req(list(range(50_000 + 100 * i, 50_000 + 100 * i + 10))), f"r{i}")
    assert first(p, req(), unknown) != "c"  # two requests queued there: 10 s
    p.completed("c", "r0")
    p.completed("c", "r1")
    assert first(p, req(), unknown) == "c"
