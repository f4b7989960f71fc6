"""The cache-aware router inside Ray Serve, on three stub replicas: where requests go
(prefix holder, session owner, least loaded when the holder is busy), the stats a replica
reports after its rows are evicted, and a row fetched from another replica giving exactly
the output a cold run gives.

The router runs in this process (the handle is here); ``where`` asks it where a request
would go without sending one, so waiting for a report to arrive never changes the state."""

from __future__ import annotations

import anyio
import pytest

import erllama
from erllama.backends import stub
from erllama.cluster import chain_hashes
from erllama.ray.wire import Accepted, GenerateRequest, Pin

from ..helpers import cold_run
from .cluster import expected_in, generate, wait_until, where, where_all
from .conftest import Fleet, fresh_tokens

pytestmark = pytest.mark.ray


def request(
    tokens: list[int], model: str = "m", *, pin: str | None = None, session: str | None = None,
    **options: object,
) -> GenerateRequest:  # fmt: skip
    options.setdefault("max_tokens", 8)
    if session is not None:
        options["session_id"] = session
    return GenerateRequest(
        model=model,
        tokens=tuple(tokens),
        options=dict(options),
        chain=tuple(chain_hashes(tokens)),
        session_id=session,
        pin=pin,
    )


def holds(fleet: Fleet, replica: str, tokens: list[int], model: str = "m") -> bool:
    """The replica's own report lists the first block of ``tokens``."""
    entry = fleet.stats(replica)["models"].get(model)
    if entry is None:
        return False
    return chain_hashes(tokens)[0] in erllama.cluster.PrefixSummary.from_wire(entry)


def test_the_next_turn_goes_to_the_replica_holding_the_conversation(fleet: Fleet) -> None:
    first = fresh_tokens(4 * 64 + 10)
    one = generate(fleet.handle, request(first))
    following = list(one.done.context) + fresh_tokens(20)[1:]
    # Once Serve counts one's request as finished, its prefix outweighs everything.
    wait_until(lambda: where(fleet.handle, request(following)) == one.replica)
    two = generate(fleet.handle, request(following))
    assert two.replica == one.replica
    assert two.done.stats.cache_delta.read >= 4 * 64  # restored, not prefilled


def test_a_busy_holder_loses_to_an_idle_replica(fleet: Fleet) -> None:
    default = where(fleet.handle, request(fresh_tokens(70), "slow"))
    a = next(r for r in fleet.replicas() if r != default)
    prompt = fresh_tokens(4 * 64 + 10)
    generate(fleet.handle, request(prompt, "slow", pin=a))
    follow = request([*prompt, 300, 301], "slow")
    wait_until(lambda: where(fleet.handle, follow) == a, what="the idle holder being chosen")
    # A long request holds a's only sequence: its queue makes it the costly choice.
    busy = fleet.handle.options(stream=True, method_name="generate").remote(
        request(fresh_tokens(8), "slow", pin=a, max_tokens=1000)
    )
    try:
        next(busy)  # accepted: a is running it
        assert where(fleet.handle, follow) != a
    finally:
        busy.cancel()
    wait_until(lambda: where(fleet.handle, follow) == a, what="a being chosen again")


def test_requests_arriving_together_spread_before_serve_confirms_any(fleet: Fleet) -> None:
    # Three cold prompts at once: Serve asks the router for all three before it hears back
    # from any replica, so only the router's own count of its choices can spread them.
    # Asked again (fresh prompts, nothing sent) until they spread over the three: a replica
    # still winding down an earlier test's cancelled request counts as loaded for a while,
    # and the router rightly avoids it (in CI two of three went to one replica once). A
    # router that did not count its choices would send all three to one replica, forever.
    def spread() -> bool:
        chosen = where_all(fleet.handle, [request(fresh_tokens(70)) for _ in range(3)])
        return sorted(chosen) == fleet.replicas()

    wait_until(spread, what="three requests arriving together spreading over three replicas")


def test_a_session_stays_on_the_replica_that_holds_it(fleet: Fleet) -> None:
    default = where(fleet.handle, request(fresh_tokens(70)))  # where a cold prompt goes
    owner = next(r for r in fleet.replicas() if r != default)
    generate(fleet.handle, request(fresh_tokens(70), session="chat-1", pin=owner))
    for _ in range(3):  # unrelated prompts: only the session ties them to the owner
        reply = generate(fleet.handle, request(fresh_tokens(70), session="chat-1"))
        assert reply.replica == owner
    wait_until(lambda: "chat-1" in fleet.stats(owner)["models"]["m"].get("sessions", []))


def test_an_evicted_prefix_stops_attracting_requests(fleet: Fleet) -> None:
    a, b = fleet.replicas()[:2]
    long = fresh_tokens(5 * 64)
    generate(fleet.handle, request(long[: 2 * 64 + 1], pin=b))  # b holds two blocks
    generate(fleet.handle, request(long, pin=a))  # a holds four
    follow = request([*long, 400, 401])
    wait_until(lambda: holds(fleet, a, long) and holds(fleet, b, long))
    wait_until(lambda: where(fleet.handle, follow) == a, what="the longer holder being chosen")
    fleet.handle.options(method_name="gc").remote(Pin(a)).result(timeout_s=30)
    wait_until(lambda: not holds(fleet, a, long), what="a's report dropping the rows")
    wait_until(lambda: where(fleet.handle, follow) == b, what="the router following a's report")


def test_a_row_fetched_from_another_replica_gives_the_cold_output(fleet: Fleet) -> None:
    a, b = fleet.replicas()[:2]
    first = generate(fleet.handle, request(fresh_tokens(5 * 64), "slow", pin=a))
    prompt = list(first.done.context) + fresh_tokens(12)[1:]
    # Rows are offered for fetching once their holder has reported them: ask the router
    # (it fills in the holders of a request it places) until a's report has arrived.
    probe = request(prompt, "slow", pin=b)
    wait_until(
        lambda: where(fleet.handle, probe) == b and probe.holders.get(a, 0) >= 5 * 64,
        what="the router learning that a holds the row",
    )
    before = fleet.handle.options(method_name="transfer_stats").remote(Pin(b)).result()
    second = generate(fleet.handle, request(prompt, "slow", pin=b))
    after = fleet.handle.options(method_name="transfer_stats").remote(Pin(b)).result()
    assert second.replica == b
    assert second.fetched_tokens >= 5 * 64
    assert after["transfers"] == before["transfers"] + 1
    assert second.done.stats.cache_delta.read >= 5 * 64  # restored from the fetched row
    registry = erllama.make_backend_registry({"stub": stub}, autoload=False)
    cold = anyio.run(lambda: cold_run(registry, prompt, max_tokens=8))
    assert second.done.token_ids == cold.token_ids


def test_a_row_still_being_prefilled_is_waited_for_and_fetched(fleet: Fleet) -> None:
    a, b = fleet.replicas()[:2]
    prompt = fresh_tokens(1800)  # "slow" prefills 800 tokens a second: 2.25 s here
    first = fleet.handle.options(stream=True, method_name="generate").remote(
        request(prompt, "slow", pin=a)
    )
    try:
        assert isinstance(next(first), Accepted)
        follow = request([*prompt, 300, 301], "slow", pin=b)
        # Until a is halfway through by the router's own expectation (what b reads to
        # decide): then a's row is nearer than b's own prefill, with time to spare. (a's
        # progress itself is not visible outside its process.)
        at_first = expected_in(fleet.handle, follow, a)
        assert at_first is not None and at_first > 0
        wait_until(
            lambda: (expected_in(fleet.handle, follow, a) or 0.0) <= at_first / 2,
            what="the router expecting a's row within half the time it first did",
        )
        before = fleet.handle.options(method_name="transfer_stats").remote(Pin(b)).result()
        second = generate(fleet.handle, follow)
        after = fleet.handle.options(method_name="transfer_stats").remote(Pin(b)).result()
    finally:
        list(first)
    # b was told a was still prefilling the prompt when its request was placed ...
    assert a in follow.filling and a not in follow.holders
    assert second.replica == b
    assert second.fetched_tokens >= 1700  # a's cold save: the prompt less its last tokens
    assert after["transfers"] == before["transfers"] + 1
    assert second.done.stats.cache_delta.read >= 1700
    registry = erllama.make_backend_registry({"stub": stub}, autoload=False)
    cold = anyio.run(lambda: cold_run(registry, list(follow.tokens), {"n_ctx": 2048}, max_tokens=8))
    assert second.done.token_ids == cold.token_ids
