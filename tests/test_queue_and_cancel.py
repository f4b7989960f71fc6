"""FIFO queueing, cancel semantics and caller-scope cancellation (asyncio and trio)."""

from __future__ import annotations

import anyio
import pytest

import erllama
from erllama import Done, Token

from .helpers import metered, release, settled, stub_config, wait_for

pytestmark = pytest.mark.anyio


async def drain(stream: erllama.InferStream) -> tuple[list[Token], Done]:
    tokens: list[Token] = []
    async for ev in stream:
        if isinstance(ev, Token):
            tokens.append(ev)
        else:
            return tokens, ev
    raise AssertionError("stream ended without Done")


async def test_requests_run_in_fifo_order_and_infer_returns_while_queued(
    engine: erllama.Engine,
) -> None:
    ctl = metered()
    # Live-KV reuse off: each prompt is then prefilled whole, which the order check reads.
    mid = await engine.load_model("m", stub_config(control=ctl, keep_live_kv=False))
    # Token ids: text would be tokenized on the model thread, which is held in a step.
    prompts = [await engine.tokenize(mid, f"prompt number {i}") for i in range(3)]
    streams = [await engine.infer(mid, p, max_tokens=2) for p in prompts]
    # All three streams exist before a single step ran.
    assert ctl.steps - ctl.active == 0  # no step has completed
    assert len({s.ref for s in streams}) == 3
    info = engine.model_info(mid)
    assert info.running + info.queue_len == 3
    dones: list[Done] = []

    async def read(s: erllama.InferStream) -> None:
        dones.append((await drain(s))[1])

    async with anyio.create_task_group() as tg:
        for s in streams:
            tg.start_soon(read, s)
        release(ctl, 100)
    # Readers wake in any order (trio shuffles them): the model's own order is what the
    # prefill history below shows.
    assert [d.finish_reason for d in dones] == ["length"] * 3
    # Each prompt was prefilled in submission order (one sequence, so one at a time).
    prefills = [
        ops[0].tokens for ops in ctl.history if isinstance(ops[0], erllama.backends.Prefill)
    ]
    assert prefills == [tuple(p) for p in prompts]


async def test_cancel_unknown_or_finished_ref_is_silent_and_idempotent(
    engine: erllama.Engine,
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    stream = await engine.infer(mid, "hello", max_tokens=2)
    await wait_for(lambda: ctl.steps == 1 and ctl.waiting == 1)  # its prefill is parked
    engine.cancel("no-such-ref")  # touches no request: the running one goes on
    release(ctl, 100)
    tokens, done = await drain(stream)
    assert done.finish_reason == "length" and len(tokens) == 2
    engine.cancel(stream.ref)
    engine.cancel(stream.ref)
    stream.cancel()
    # The finished stream gets no second terminal event; the model holds nothing ...
    assert [ev async for ev in stream] == []
    assert engine.in_flight() == []
    info = engine.model_info(mid)
    assert (info.status, info.running, info.queue_len) == ("idle", 0, 0)
    # ... and its next request is not the one a stale cancel lands on.
    again = await engine.complete(mid, "hello", max_tokens=2)
    assert again.finish_reason == "length"
    assert again.token_ids == tuple(t.token_id for t in tokens)


async def test_cancel_removes_a_queued_request_at_once_and_it_never_runs(
    engine: erllama.Engine,
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    first = await engine.infer(mid, "first request", max_tokens=3)
    queued = await engine.infer(mid, "second request", max_tokens=3)
    await wait_for(lambda: ctl.steps == 1 and ctl.waiting == 1)
    assert engine.model_info(mid).queue_len == 1
    engine.cancel(queued.ref)
    engine.cancel(queued.ref)  # idempotent
    assert engine.model_info(mid).queue_len == 0
    tokens, done = await drain(queued)  # ends while the model is still blocked
    assert tokens == [] and done.finish_reason == "cancelled"
    assert done.stats.completion_tokens == 0
    release(ctl, 100)
    _, done_first = await drain(first)
    assert done_first.finish_reason == "length"
    second_prompt = tuple(await engine.tokenize(mid, "second request"))
    assert all(
        not (isinstance(op, erllama.backends.Prefill) and tuple(op.tokens) == second_prompt)
        for ops in ctl.history
        for op in ops
    )


async def test_cancel_mid_generation_stops_before_the_next_token(engine: erllama.Engine) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    stream = await engine.infer(mid, "tell me a story", max_tokens=50)
    release(ctl, 3)  # prefill + two decodes
    got: list[Token] = []
    async for ev in stream:
        assert isinstance(ev, Token)
        got.append(ev)
        if len(got) == 2:
            break
    await wait_for(lambda: ctl.steps == 4 and ctl.waiting == 1)  # step 4 waits for a permit
    stream.cancel()
    release(ctl, 100)
    rest, done = await drain(stream)
    assert rest == []  # the in-flight step's token is never delivered ...
    assert done.finish_reason == "cancelled"
    assert done.stats.completion_tokens == 2  # ... nor counted
    assert done.stats.context_tokens == done.stats.prompt_tokens + 3  # though in the KV
    await wait_for(lambda: engine.status(mid) == "idle")
    await settled(engine, mid)  # its thread went round since: a further step would have run
    assert ctl.steps == 4  # no generation continued
    after = await engine.complete(mid, "tell me a story", max_tokens=4)
    assert after.finish_reason == "length" and len(after.token_ids) == 4


async def test_leaving_the_stream_context_cancels_the_request(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config(step_delay_s=0.002))
    async with await engine.infer(mid, "go on", max_tokens=10_000) as stream:
        async for ev in stream:
            assert isinstance(ev, Token)
            break
    await wait_for(lambda: engine.status(mid) == "idle")
    assert engine.model_info(mid).running == 0


async def test_cancelling_the_callers_scope_cancels_the_request_in_the_model(
    engine: erllama.Engine,
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    release(ctl, 5)

    async def give_up(scope: anyio.CancelScope) -> None:
        # Five steps ran and the sixth waits for a permit: the caller's scope ends then.
        await wait_for(lambda: ctl.steps == 6 and ctl.waiting == 1)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(give_up, scope)
            await engine.complete(mid, "a long answer please", max_tokens=10_000)
    assert scope.cancelled_caught
    release(ctl, 100)
    await wait_for(lambda: engine.status(mid) == "idle")
    await settled(engine, mid)  # its thread went round since: a further step would have run
    assert ctl.steps == 6  # the step under way when the caller left, and no other
    assert engine.model_info(mid).running == 0


async def test_max_queue_bounds_waiting_requests(engine: erllama.Engine) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, max_queue=1))
    running = await engine.infer(mid, "one", max_tokens=1)
    waiting = await engine.infer(mid, "two", max_tokens=1)
    with pytest.raises(erllama.QueueFull) as exc:
        await engine.infer(mid, "three", max_tokens=1)
    assert exc.value.limit == 1 and exc.value.model_id == mid
    release(ctl, 100)
    for s in (running, waiting):
        _, done = await drain(s)
        assert done.finish_reason == "length"


async def test_status_list_and_cancel_answer_while_a_step_is_blocked(
    engine: erllama.Engine,
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    other = await engine.load_model("other", stub_config())
    stream = await engine.infer(mid, "block here", max_tokens=5)
    await wait_for(lambda: ctl.steps == 1 and ctl.waiting == 1)
    # The native step is blocked in its thread; none of these may wait for it.
    with anyio.fail_after(1):
        assert engine.status(mid) == "prefilling"
        assert {i.id for i in engine.list_models()} == {mid, other}
        assert engine.model_info(mid).running == 1
        engine.cancel(stream.ref)
        # Another model keeps serving meanwhile.
        assert (await engine.complete(other, "hi", max_tokens=2)).finish_reason == "length"
    assert ctl.waiting == 1  # still blocked
    release(ctl, 100)
    _, done = await drain(stream)
    assert done.finish_reason == "cancelled"


async def test_multi_sequence_steps_batch_every_admitted_sequence(engine: erllama.Engine) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl, n_seq_max=2))
    a = await engine.infer(mid, "first one", max_tokens=4)
    b = await engine.infer(mid, "second one", max_tokens=4)
    release(ctl, 100)
    (ta, _), (tb, _) = await drain(a), await drain(b)
    assert len(ta) == len(tb) == 4
    assert any(len({op.seq for op in ops}) == 2 for ops in ctl.history)
    # Batching does not change results: each equals its solo run.
    solo = await engine.complete(mid, "first one", max_tokens=4)
    assert solo.token_ids == tuple(t.token_id for t in ta)


async def test_a_sampled_token_streams_before_its_forward_pass_finishes(
    engine: erllama.Engine,
) -> None:
    import threading

    from erllama.backends.stub import StubControl

    forward = threading.Event()
    ctl = StubControl(forward_gate=forward)
    mid = await engine.load_model("m", stub_config(control=ctl))
    stream = await engine.infer(mid, "first token early", max_tokens=2)
    with anyio.fail_after(5):
        first = await stream.__anext__()
    assert isinstance(first, Token)
    assert ctl.active == 1  # its step cannot finish before forward_gate is set
    forward.set()
    _, done = await drain(stream)
    assert done.stats.completion_tokens == 2
    assert done.stats.time_to_first_token_s is not None
