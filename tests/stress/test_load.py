"""About a thousand concurrent requests over four models of one engine.

The models differ in how many sequences they batch (1 to 4), how many requests may wait
(two of them have a small ``max_queue``, so a burst is partly refused) and whether the stub
ends generation on its own (``eog_every``). Requests come as a burst and then spread over
half a second; they mix token-id and text prompts, greedy and sampled decoding, and every
fortieth is one fixed prompt whose answer is known in advance.

Pinned:

* every request is either answered (exactly one ``Done`` ending its events, a finish
  reason and token counts that agree with its ``max_tokens``, its context and its streamed
  tokens) or refused at ``infer()`` with a typed ``QueueFull`` naming its model and limit;
* requests to one model are admitted in submission order: the order of refs (a model
  numbers requests as it queues them) is the order in which their prompts first reach the
  model (each prompt carries a tag token seen nowhere else). Slices inside one step are
  ordered shortest-first, so the check reads the step in which a prompt first appears,
  never the order of ops inside a step;
* every answer to the fixed prompt, under load and after it, equals a cold run's;
* afterwards every model is idle with nothing queued or running, and the engine holds no
  request.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama import Done, Token
from erllama.backends import Prefill
from erllama.backends.stub import EOS, WORD_BASE, StubControl, _word
from erllama.plugins import BackendRegistry

from ..helpers import cold_run, stub_config
from .conftest import record

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FILE = "load"
N_REQUESTS = 1000
#: The first requests arrive at once (so the small queues overflow); the rest spread
#: evenly over ``SPREAD_S``.
BURST = 400
SPREAD_S = 0.5
#: Every request is answered or refused within this (a hang fails, it never waits out
#: pytest's timeout).
LOAD_S = 45.0
#: One fixed prompt every ``FIXED_EVERY`` requests: its greedy answer is known.
FIXED_EVERY = 40
FIXED = [WORD_BASE + 500 + i for i in range(12)]
FIXED_MAX = 8
#: Tag tokens: word ``TAG_BASE + i`` starts request i's prompt and appears nowhere else.
TAG_BASE = 20_000


@attrs.frozen(kw_only=True)
class ModelSpec:
    n_seq_max: int
    max_queue: int
    #: Stub options (``eog_every``: the stub ends generation by itself now and then;
    #: ``step_delay_s``: it sleeps that long each step).
    options: Mapping[str, Any] = attrs.field(factory=dict)


#: The two with a small queue step a little slower (a millisecond per step), so the burst
#: overflows their queues for certain: a free-running stub drains a queue as fast as a
#: burst fills it.
MODELS = {
    "solo": ModelSpec(n_seq_max=1, max_queue=4, options={"step_delay_s": 0.001}),
    "pair": ModelSpec(n_seq_max=2, max_queue=1000),
    "trio": ModelSpec(n_seq_max=3, max_queue=4, options={"eog_every": 5, "step_delay_s": 0.001}),
    "quad": ModelSpec(n_seq_max=4, max_queue=1000, options={"eog_every": 7}),
}


@attrs.define(eq=False, kw_only=True)
class Planned:
    """One request of the load and what became of it."""

    i: int
    model: str
    prompt: str | list[int]
    max_tokens: int
    sampling: dict[str, Any]
    delay: float
    #: The tag token that marks this prompt in the model's step history (None: the fixed
    #: prompt, sent many times).
    tag: int | None
    #: Set when answered: the ref's number (submission order on its model) and its Done.
    ref: int | None = None
    done: Done | None = None
    refused: erllama.QueueFull | None = None


def plan(rng: random.Random) -> list[Planned]:
    names = list(MODELS)
    out = []
    for i in range(N_REQUESTS):
        model = names[i % len(names)]
        delay = 0.0 if i < BURST else rng.uniform(0, SPREAD_S)
        if i % FIXED_EVERY == 0:
            out.append(
                Planned(
                    i=i,
                    model=model,
                    prompt=list(FIXED),
                    max_tokens=FIXED_MAX,
                    sampling={},
                    delay=delay,
                    tag=None,
                )
            )
            continue
        tag = WORD_BASE + TAG_BASE + i
        filler = [WORD_BASE + rng.randrange(5000) for _ in range(rng.randrange(3, 20))]
        kind = rng.choices(["ids", "text", "sampled"], weights=[70, 15, 15])[0]
        prompt: str | list[int]
        if kind == "text":
            # Tokenised as BOS, the tag, then one token per word.
            prompt = " ".join(_word(t - WORD_BASE) for t in [tag, *filler])
        else:
            prompt = [tag, *filler]
        sampling: dict[str, Any] = (
            {"temperature": 0.8, "top_k": 40, "seed": i} if kind == "sampled" else {}
        )
        out.append(
            Planned(
                i=i,
                model=model,
                prompt=prompt,
                max_tokens=rng.randint(1, 8),
                sampling=sampling,
                delay=delay,
                tag=tag,
            )
        )
    return out


async def run_one(engine: erllama.Engine, p: Planned) -> None:
    await anyio.sleep(p.delay)  # its planned arrival: random jitter, not synchronisation
    try:
        stream = await engine.infer(p.model, p.prompt, max_tokens=p.max_tokens, **p.sampling)
    except erllama.QueueFull as exc:
        p.refused = exc
        return
    model, _, number = stream.ref.rpartition("#")
    assert model == p.model
    p.ref = int(number)
    async with stream:
        events = [ev async for ev in stream]
    dones = [ev for ev in events if isinstance(ev, Done)]
    assert len(dones) == 1 and events[-1] is dones[0], "exactly one Done, and it comes last"
    assert all(isinstance(ev, Token) for ev in events[:-1])
    p.done = dones[0]
    assert tuple(ev.token_id for ev in events[:-1]) == p.done.token_ids


def check_answer(p: Planned) -> None:
    """Finish reason, token counts, context and streamed tokens agree."""
    done = p.done
    assert done is not None
    st, ids, n = done.stats, done.token_ids, len(done.token_ids)
    eog_model = bool(MODELS[p.model].options.get("eog_every"))
    if done.finish_reason == "length":
        assert n == p.max_tokens == st.completion_tokens
        assert done.context[len(done.context) - n :] == ids
    else:
        # Only the models told to end generation now and then stop before max_tokens; the
        # end-of-generation token is in the KV, but neither streamed nor counted.
        assert done.finish_reason == "stop" and eog_model, done
        assert n < p.max_tokens and st.completion_tokens == n
        assert done.context[-1] == EOS and done.context[len(done.context) - 1 - n : -1] == ids
    eog = 1 if done.finish_reason == "stop" else 0
    assert len(done.context) == st.prompt_tokens + st.completion_tokens + eog
    assert not st.cancelled and st.stop_sequence is None
    if not isinstance(p.prompt, str):
        assert st.prompt_tokens == len(p.prompt)
        assert done.context[: len(p.prompt)] == tuple(p.prompt)


def first_appearance(history: Sequence[Sequence[object]], tags: set[int]) -> dict[int, int]:
    """Tag token -> index of the first step that fed it."""
    first: dict[int, int] = {}
    for step, ops in enumerate(history):
        for op in ops:
            if isinstance(op, Prefill):
                for t in op.tokens:
                    if t in tags and t not in first:
                        first[t] = step
    return first


async def test_a_thousand_concurrent_requests_are_answered_or_refused_in_fifo_order(
    engine: erllama.Engine, registry: BackendRegistry
) -> None:
    controls = {name: StubControl() for name in MODELS}
    for name, spec in MODELS.items():
        await engine.load_model(
            name,
            stub_config(
                control=controls[name],
                n_seq_max=spec.n_seq_max,
                max_queue=spec.max_queue,
                **spec.options,
            ),
        )
    cold = {
        name: await cold_run(registry, list(FIXED), spec.options, max_tokens=FIXED_MAX)
        for name, spec in MODELS.items()
    }
    planned = plan(random.Random(20240601))

    with anyio.fail_after(LOAD_S):
        async with anyio.create_task_group() as tg:
            for p in planned:
                tg.start_soon(run_one, engine, p)

    answered = [p for p in planned if p.done is not None]
    refused = [p for p in planned if p.refused is not None]
    assert len(answered) + len(refused) == N_REQUESTS
    record(f"{FILE}: requests answered", len(answered))
    record(f"{FILE}: requests refused (QueueFull)", len(refused))

    for p in refused:
        assert p.refused is not None
        assert (p.refused.model_id, p.refused.limit) == (p.model, MODELS[p.model].max_queue)
    for p in answered:
        check_answer(p)
        if p.tag is None:
            assert p.done is not None and p.done.token_ids == cold[p.model].token_ids
    by_model: dict[str, list[Planned]] = defaultdict(list)
    for p in planned:
        by_model[p.model].append(p)
    for name, spec in MODELS.items():
        mine = by_model[name]
        assert any(p.done for p in mine), f"{name} answered nothing"
        if spec.max_queue < 100:
            assert any(p.refused for p in mine), f"the burst never filled {name}'s queue"
        else:
            assert not any(p.refused for p in mine)
        check_fifo(name, mine, controls[name])

    # Nothing is left behind: every model idle, no request queued, running or in flight.
    for name in MODELS:
        info = engine.model_info(name)
        assert (info.status, info.queue_len, info.running) == ("idle", 0, 0), info
    assert engine.queue_depth() == 0
    assert engine.in_flight() == []
    # And the load changed nothing a later request sees.
    for name in MODELS:
        after = await engine.complete(name, list(FIXED), max_tokens=FIXED_MAX)
        assert (after.text, after.token_ids) == (cold[name].text, cold[name].token_ids)


def check_fifo(name: str, mine: list[Planned], control: StubControl) -> None:
    tagged = [p for p in mine if p.tag is not None]
    first = first_appearance(control.history, {p.tag for p in tagged if p.tag is not None})
    for p in tagged:
        if p.refused is not None:
            assert p.tag not in first, f"refused request {p.i} reached {name}"
        else:
            assert p.tag in first, f"answered request {p.i} never reached {name}"
    admitted = sorted((p for p in tagged if p.ref is not None), key=lambda p: p.ref or 0)
    steps = [first[p.tag] for p in admitted if p.tag is not None]
    out_of_order = [
        (a.i, b.i)
        for a, b, sa, sb in zip(admitted, admitted[1:], steps, steps[1:], strict=False)
        if sb < sa
    ]
    assert out_of_order == [], f"{name} admitted requests out of submission order"
    if MODELS[name].n_seq_max == 1:
        # One sequence: one prompt per step at most, so the order is strict.
        assert steps == sorted(set(steps))
