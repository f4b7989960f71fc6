"""Requests that run together and share a prompt prefix prefill it once (issue 22).

A request admitted while another one is still to feed the prefix they share waits for it and
copies those cells from the other's sequence, then feeds only its own rest. On the stub
(whose cells do not depend on batching) any shared prefix qualifies; the real-model rules
(whole grid cells) are checked in tests/real/test_shared_prefill_real.py.
"""

from __future__ import annotations

from collections import Counter

import anyio
import attrs
import pytest

import erllama
from erllama.backends import Prefill
from erllama.backends.stub import StubControl
from erllama.plugins import BackendRegistry

from .helpers import cold_run, metered, release, stub_config, wait_for

pytestmark = pytest.mark.anyio

SHARED = [1, *range(300, 400)]  # 101 tokens: seven grid cells of 16 and a bit
PROMPTS = [[*SHARED, 500 + i, 600 + i, 700 + i] for i in range(4)]


def fed(ctl: StubControl) -> Counter[int]:
    """Prompt tokens fed per sequence."""
    out: Counter[int] = Counter()
    for ops in ctl.history:
        for op in ops:
            if isinstance(op, Prefill):
                out[op.seq] += len(op.tokens)
    return out


def queued_or_running(engine: erllama.Engine, mid: str) -> int:
    info = engine.model_info(mid)
    return info.queue_len + info.running


async def run_together(
    engine: erllama.Engine, mid: str, ctl: StubControl, prompts: list[list[int]], **kw: object
) -> list[erllama.Completion]:
    """Queue every prompt while the model is held mid-step, then let it run."""
    results: list[erllama.Completion | None] = [None] * len(prompts)

    async def one(i: int) -> None:
        results[i] = await engine.complete(mid, prompts[i], max_tokens=4, **kw)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
            await wait_for(lambda i=i: queued_or_running(engine, mid) > i)
        release(ctl, 100_000)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def test_four_requests_with_one_prefix_prefill_it_once(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=4, prefill_chunk=16))
    done = await run_together(engine, mid, ctl, PROMPTS)
    kinds = sorted((d.cache_hit_kind, d.cache_delta.read) for d in done)
    # One request fed the shared prefix; the three others took it (all of it: the stub's
    # cells do not depend on batching) and fed their own three tokens.
    assert kinds == [("cold", 0), ("partial", 101), ("partial", 101), ("partial", 101)]
    explained = sorted(
        (e.cause, e.tier, e.restored)
        for d in done
        if (e := d.stats.cache_explain) is not None and e.restored
    )
    assert explained == [("shared", "shared", 101)] * 3
    # Where their time went: the followers waited for the leader's prefill, the leader not.
    waits = sorted(d.stats.shared_wait_s for d in done)
    assert waits[0] == 0.0 and all(w > 0 for w in waits[1:])
    assert sum(fed(ctl).values()) == len(PROMPTS[0]) + 3 * 3
    for prompt, d in zip(PROMPTS, done, strict=True):
        assert d.token_ids == (await cold_run(registry, prompt, max_tokens=4)).token_ids
    assert engine.model_info(mid).last_cache_hit is not None


async def test_the_same_prompt_n_times_feeds_it_once_and_answers_alike(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=3, prefill_chunk=16))
    done = await run_together(engine, mid, ctl, [PROMPTS[0]] * 3)
    # The followers re-feed the last token for their own logits, as an exact hit does.
    assert sorted(d.cache_delta.read for d in done) == [0, 103, 103]
    assert sum(fed(ctl).values()) == len(PROMPTS[0]) + 2
    reference = (await cold_run(registry, PROMPTS[0], max_tokens=4)).token_ids
    assert [d.token_ids for d in done] == [reference] * 3


async def test_a_follower_whose_leader_is_cancelled_feeds_on_its_own(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2, prefill_chunk=16))
    leader = await engine.infer(mid, PROMPTS[0], max_tokens=4)
    await wait_for(lambda: ctl.waiting == 1, what="the leader's first step parked")
    follower_done: list[erllama.Completion] = []

    async def follow() -> None:
        follower_done.append(await engine.complete(mid, PROMPTS[1], max_tokens=4))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await wait_for(lambda: engine.model_info(mid).queue_len == 1, what="the follower queued")
        release(ctl)  # step 1 (the leader's first chunk) ends; the follower is admitted
        await wait_for(lambda: engine.model_info(mid).running == 2, what="both admitted")
        await leader.aclose()  # before its prefill reached the shared 101 tokens
        release(ctl, 100_000)
    (d,) = follower_done
    # The leader fed two grid cells (the second in the step already planned, waiting for
    # its permit, when it was cancelled); the follower its whole prompt.
    assert d.cache_hit_kind == "cold"
    assert sum(fed(ctl).values()) == 2 * 16 + len(PROMPTS[1])
    assert d.token_ids == (await cold_run(registry, PROMPTS[1], max_tokens=4)).token_ids


async def test_other_salts_and_share_prefill_off_share_nothing(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2, prefill_chunk=16))
    results: list[erllama.Completion] = []

    async def one(prompt: list[int], salt: str) -> None:
        results.append(await engine.complete(mid, prompt, max_tokens=2, cache_salt=salt))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, PROMPTS[0], "tenant-a")
        await wait_for(lambda: engine.model_info(mid).running == 1)
        tg.start_soon(one, PROMPTS[1], "tenant-b")
        await wait_for(lambda: queued_or_running(engine, mid) == 2)
        release(ctl, 100_000)
    assert [r.cache_hit_kind for r in results] == ["cold", "cold"]
    assert sum(fed(ctl).values()) == len(PROMPTS[0]) + len(PROMPTS[1])

    off = metered()
    config = stub_config(control=off, n_seq_max=4, prefill_chunk=16)
    mid2 = await engine.load_model("off", attrs.evolve(config, share_prefill=False))
    done = await run_together(engine, mid2, off, PROMPTS)
    assert [d.cache_hit_kind for d in done] == ["cold"] * 4
    assert sum(fed(off).values()) == sum(map(len, PROMPTS))


async def test_a_prefix_shorter_than_min_tokens_is_not_waited_for(engine: erllama.Engine) -> None:
    """A shared BOS or a few template tokens are not worth a wait: each feeds alone."""
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2, prefill_chunk=16))
    short = [[1, 2, 3, *range(300 + 50 * i, 340 + 50 * i)] for i in range(2)]  # 3 in common
    done = await run_together(engine, mid, ctl, short)
    assert [d.cache_hit_kind for d in done] == ["cold", "cold"]
    assert sum(fed(ctl).values()) == sum(map(len, short))
