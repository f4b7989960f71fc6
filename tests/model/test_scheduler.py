"""The batch scheduler as the model thread and the event loop drive it, one behaviour each.

Every test works on the bare state machine: no backend, no threads. The helpers below move
jobs through the protocol (submit -> admit -> start -> plan/apply -> finish) the way
erllama.model.thread does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from erllama.backends.types import (
    Decode,
    Prefill,
    Prefilled,
    Sampled,
    SeqFailed,
    StepOp,
    StepResult,
)
from erllama.errors import QueueFull, SessionBusy
from erllama.model.scheduler import Barrier, Job, JobState, Sampling, Scheduler

# ---- helpers ------------------------------------------------------------------------------


def new_scheduler(**overrides: Any) -> Scheduler:
    params: dict[str, Any] = {
        "model_id": "m",
        "n_seq": 2,
        "n_batch": 16,
        "prefill_chunk": 8,
        "n_ctx": 64,
        "max_queue": 8,
    }
    params.update(overrides)
    return Scheduler(**params)


@pytest.fixture
def sched() -> Scheduler:
    """Two sequences, a batch of 16, prefill slices of 8, a context of 64."""
    return new_scheduler()


def lowest(job: Job, free: Sequence[int]) -> int:
    return min(free)


def highest(job: Job, free: Sequence[int]) -> int:
    return max(free)


def queued(sched: Scheduler, *, max_tokens: int | None = 8, session: str | None = None) -> Job:
    job = Job(max_tokens=max_tokens, session=session)
    sched.submit(job)
    return job


def admitted(sched: Scheduler, **kw: Any) -> Job:
    """A job that holds a sequence and waits for its prefix (ADMITTING)."""
    job = queued(sched, **kw)
    assert sched.admit(lowest) == [job]
    return job


def running(
    sched: Scheduler,
    *,
    prompt: int = 4,
    n_context: int = 0,
    pause_at: int | None = None,
    **kw: Any,
) -> Job:
    """A started job whose sequence holds ``n_context`` tokens of a ``prompt``-token prompt;
    the rest is its cursor."""
    job = admitted(sched, **kw)
    sched.start(job, n_context=n_context, cursor=list(range(n_context, prompt)), pause_at=pause_at)
    return job


def answer(op: StepOp, *, token: int = 0, eog: bool = False) -> StepResult:
    """What a backend returns for ``op`` when it succeeds."""
    if isinstance(op, Prefill):
        return Prefilled(seq=op.seq, n_tokens=len(op.tokens))
    return Sampled(seq=op.seq, token=token, eog=eog)


def step_only(sched: Scheduler, job: Job) -> None:
    """Run one step for ``job`` alone (other jobs' ops are left out of the step)."""
    ops = [op for op in sched.plan() if op.seq == job.seq]
    sched.apply(ops, [answer(op) for op in ops])


def decoding(sched: Scheduler, *, n_context: int = 4, **kw: Any) -> Job:
    """A running job whose prompt is in its sequence: its next op is a Decode."""
    job = running(sched, prompt=n_context, n_context=n_context - 1, **kw)
    step_only(sched, job)
    assert not job.feeding
    return job


def seq_of(job: Job) -> int:
    assert job.seq is not None
    return job.seq


def op_for(ops: Sequence[StepOp], job: Job) -> StepOp:
    (op,) = (op for op in ops if op.seq == job.seq)
    return op


def slices(ops: Sequence[StepOp]) -> list[tuple[int, int]]:
    """(seq, token count) of each Prefill, in plan order."""
    return [(op.seq, len(op.tokens)) for op in ops if isinstance(op, Prefill)]


# ---- admission and the queue --------------------------------------------------------------


def test_jobs_are_admitted_in_submission_order_while_sequences_are_free(
    sched: Scheduler,
) -> None:
    first, second, third = (queued(sched) for _ in range(3))
    assert sched.admit(lowest) == [first, second]
    assert first.state is second.state is JobState.ADMITTING
    assert third.state is JobState.QUEUED
    assert list(sched.queue) == [third]


def test_admission_gives_the_job_the_sequence_choose_picked(sched: Scheduler) -> None:
    job = queued(sched)
    sched.admit(highest)
    assert job.seq == 1
    assert sched.admitted == {1: job}
    assert sched.free == [0]


def test_the_next_queued_job_is_admitted_once_a_sequence_frees(sched: Scheduler) -> None:
    first = admitted(sched)
    admitted(sched)
    waiting = queued(sched)
    assert sched.admit(lowest) == []
    sched.finish(first, "stop")
    assert sched.admit(lowest) == [waiting]
    assert waiting.seq == first.seq


def test_requests_that_get_a_free_sequence_at_once_do_not_count_as_waiting() -> None:
    sched = new_scheduler(n_seq=2, max_queue=0)
    queued(sched)
    queued(sched)
    with pytest.raises(QueueFull) as caught:
        queued(sched)
    assert caught.value.limit == 0


def test_queue_full_once_max_queue_requests_wait_behind_busy_sequences() -> None:
    sched = new_scheduler(n_seq=1, max_queue=2)
    admitted(sched)
    queued(sched)
    queued(sched)
    with pytest.raises(QueueFull):
        sched.check_room()
    with pytest.raises(QueueFull):
        queued(sched)
    assert sched.waiting == 2


# ---- cancel -------------------------------------------------------------------------------


def test_cancelling_a_queued_job_ends_it_at_once(sched: Scheduler) -> None:
    job = queued(sched)
    assert sched.cancel(job) is True
    assert job.state is JobState.DONE
    assert job.outcome == "cancelled"
    assert sched.take_ended() == [job]


def test_a_cancelled_queued_job_is_never_admitted() -> None:
    sched = new_scheduler(n_seq=1)
    admitted(sched)
    gone, kept = queued(sched), queued(sched)
    sched.cancel(gone)
    assert list(sched.queue) == [kept]
    sched.finish(sched.admitted[0], "stop")
    assert sched.admit(lowest) == [kept]
    assert gone.seq is None


def test_cancelling_an_admitted_job_only_marks_it(sched: Scheduler) -> None:
    job = running(sched)
    assert sched.cancel(job) is False
    assert job.state is JobState.RUNNING
    assert job.cancel_requested
    assert sched.to_cancel() == [job]
    assert sched.take_ended() == []


def test_a_job_marked_for_cancel_gets_no_op(sched: Scheduler) -> None:
    job = running(sched)
    sched.cancel(job)
    assert sched.plan() == []


def test_a_marked_job_ends_cancelled_when_the_driver_finishes_it(sched: Scheduler) -> None:
    job = running(sched)
    sched.cancel(job)
    sched.finish(job, "cancelled")
    assert job.state is JobState.DONE
    assert job.outcome == "cancelled"
    assert sched.take_ended() == [job]
    assert sched.to_cancel() == []
    assert job.seq in sched.free


def test_cancelling_an_ended_job_does_nothing(sched: Scheduler) -> None:
    job = queued(sched)
    sched.cancel(job)
    sched.take_ended()
    assert sched.cancel(job) is False
    assert sched.take_ended() == []


# ---- plan ---------------------------------------------------------------------------------


def test_every_decoding_job_gets_one_decode(sched: Scheduler) -> None:
    first, second = decoding(sched), decoding(sched)
    ops = sched.plan()
    assert sorted(ops, key=lambda op: op.seq) == [
        Decode(seq=seq_of(first)),
        Decode(seq=seq_of(second)),
    ]


def test_a_decode_carries_the_jobs_sampler_and_greedy_flag(sched: Scheduler) -> None:
    job = decoding(sched)
    job.sampler = sampler = object()
    job.greedy = True
    assert sched.plan() == [Decode(seq=seq_of(job), sampler=sampler, greedy=True)]


def test_feeders_of_equal_length_share_what_is_left_of_n_batch_in_admission_order() -> None:
    sched = new_scheduler(n_seq=4, n_batch=16, prefill_chunk=8)
    decoder = decoding(sched)
    # Admitted onto the highest free sequence each: admission order is not seq order.
    feeders = []
    for _ in range(3):
        job = queued(sched)
        sched.admit(highest)
        sched.start(job, n_context=0, cursor=list(range(20)), pause_at=None)
        feeders.append(job)
    a, b, _c = feeders
    ops = sched.plan()
    assert op_for(ops, decoder) == Decode(seq=seq_of(decoder))
    # 15 tokens are left after the decode: 8 to the first feeder, 7 to the next.
    assert slices(ops) == [(a.seq, 8), (b.seq, 7)]


def test_a_slice_is_at_most_prefill_chunk_tokens(sched: Scheduler) -> None:
    job = running(sched, prompt=30)
    assert slices(sched.plan()) == [(job.seq, 8)]


def test_a_slice_feeds_the_cursor_from_its_start(sched: Scheduler) -> None:
    job = running(sched, prompt=30, n_context=10)
    op = op_for(sched.plan(), job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(10, 18))


def test_feeding_never_goes_past_the_pause_point(sched: Scheduler) -> None:
    job = running(sched, prompt=30, pause_at=5)
    op = op_for(sched.plan(), job)
    assert isinstance(op, Prefill)
    assert len(op.tokens) == 5
    assert op.logits is False


def test_a_paused_job_gets_no_op_until_the_driver_resumes_it(sched: Scheduler) -> None:
    job = running(sched, prompt=30, pause_at=5)
    step_only(sched, job)
    assert job.paused
    assert sched.plan() == []
    job.pause_at = None  # the driver made its cold save
    assert slices(sched.plan()) == [(job.seq, 8)]


def test_logits_only_on_the_last_token_of_the_cursor(sched: Scheduler) -> None:
    job = running(sched, prompt=12)
    first = op_for(sched.plan(), job)
    assert isinstance(first, Prefill)
    assert (len(first.tokens), first.logits) == (8, False)
    step_only(sched, job)
    last = op_for(sched.plan(), job)
    assert isinstance(last, Prefill)
    assert (len(last.tokens), last.logits) == (4, True)


def test_a_prefill_only_job_never_asks_for_logits(sched: Scheduler) -> None:
    job = running(sched, prompt=3, max_tokens=0)
    op = op_for(sched.plan(), job)
    assert isinstance(op, Prefill)
    assert len(op.tokens) == 3
    assert op.logits is False


def test_a_prefill_only_job_gets_no_decode_once_its_prompt_is_in(sched: Scheduler) -> None:
    job = running(sched, prompt=3, max_tokens=0)
    step_only(sched, job)
    assert sched.plan() == []


def test_an_admitting_job_gets_no_op(sched: Scheduler) -> None:
    admitted(sched)
    assert sched.plan() == []


def test_a_short_prompt_admitted_while_a_long_one_feeds_gets_its_whole_prompt_next_step(
    sched: Scheduler,
) -> None:
    long = running(sched, prompt=100)
    step_only(sched, long)
    short = running(sched, prompt=5)
    ops = sched.plan()
    # Shortest remaining first: the short prompt is fed whole, the long one takes the rest.
    assert slices(ops) == [(short.seq, 5), (long.seq, 8)]
    assert op_for(ops, short) == Prefill(seq=seq_of(short), tokens=(0, 1, 2, 3, 4), logits=True)


def test_a_long_prompt_does_not_starve_a_short_one_when_its_chunk_fills_the_batch() -> None:
    # prefill_chunk == n_batch is what EngineConfig.effective_prefill_chunk gives for any
    # n_batch <= 64. The plan() docstring (and EngineConfig.prefill_chunk's) promises that a
    # short request arriving while a long prompt prefills gets in after one chunk, not after
    # the whole prompt.
    sched = new_scheduler(n_seq=2, n_batch=8, prefill_chunk=8)
    long = running(sched, prompt=100)
    step_only(sched, long)
    short = running(sched, prompt=3)
    assert any(op.seq == short.seq for op in sched.plan())


def test_feeders_are_served_shortest_remaining_first() -> None:
    sched = new_scheduler(n_seq=3, n_batch=10, prefill_chunk=8)
    long = running(sched, prompt=40)
    mid = running(sched, prompt=6)
    short = running(sched, prompt=2)
    assert slices(sched.plan()) == [(short.seq, 2), (mid.seq, 6), (long.seq, 2)]


def test_a_decoder_is_never_starved_by_feeders() -> None:
    sched = new_scheduler(n_seq=3, n_batch=3, prefill_chunk=8)
    # The feeders are admitted before the decoder, and feed only once it decodes.
    first, second = admitted(sched), admitted(sched)
    decoder = decoding(sched)
    for job in (first, second):
        sched.start(job, n_context=0, cursor=list(range(50)), pause_at=None)
    ops = sched.plan()
    assert op_for(ops, decoder) == Decode(seq=seq_of(decoder))
    assert slices(ops) == [(first.seq, 2)]
    assert second.seq not in {op.seq for op in ops}


# ---- apply --------------------------------------------------------------------------------


def test_prefilled_advances_the_cursor_and_the_context(sched: Scheduler) -> None:
    job = running(sched, prompt=20, n_context=2)
    ops = sched.plan()
    out = sched.apply(ops, [Prefilled(seq=seq_of(job), n_tokens=8)])
    assert job.cursor == list(range(10, 20))
    assert job.n_context == 10
    assert out.fed == [(job, tuple(range(2, 10)))]


def test_sampled_counts_one_more_token_and_is_returned(sched: Scheduler) -> None:
    job = decoding(sched, n_context=4)
    ops = sched.plan()
    out = sched.apply(ops, [Sampled(seq=seq_of(job), token=42, eog=True)])
    assert (job.n_context, job.n_generated) == (5, 1)
    assert out.sampled == [Sampling(job, 42, True)]


def test_a_failed_op_is_returned_as_failed_and_leaves_the_job_as_it_was(
    sched: Scheduler,
) -> None:
    job = running(sched, prompt=20)
    error = RuntimeError("sampler broke")
    out = sched.apply(sched.plan(), [SeqFailed(seq=seq_of(job), error=error)])
    assert out.failed == [(job, error)]
    assert (job.n_context, len(job.cursor), job.state) == (0, 20, JobState.RUNNING)


@pytest.mark.parametrize(
    ("results", "match"),
    [
        pytest.param([Prefilled(seq=0, n_tokens=8)], "no step result", id="unanswered-op"),
        pytest.param(
            [
                Prefilled(seq=0, n_tokens=8),
                Prefilled(seq=1, n_tokens=4),
                Prefilled(seq=0, n_tokens=8),
            ],
            "had no op",
            id="answered-twice",
        ),
        pytest.param(
            [Prefilled(seq=0, n_tokens=8), Sampled(seq=1, token=0, eog=False)],
            "sampled result for a prefill",
            id="sampled-for-prefill",
        ),
        pytest.param(
            [Prefilled(seq=0, n_tokens=7), Prefilled(seq=1, n_tokens=4)],
            "does not match",
            id="short-prefill",
        ),
    ],
)
def test_results_that_do_not_answer_the_steps_ops_raise(
    sched: Scheduler, results: list[StepResult], match: str
) -> None:
    running(sched, prompt=20)
    running(sched, prompt=4)
    ops = sched.plan()
    assert sorted(slices(ops)) == [(0, 8), (1, 4)]
    with pytest.raises(ValueError, match=match):
        sched.apply(ops, results)


def test_a_result_for_a_sequence_without_an_op_raises(sched: Scheduler) -> None:
    running(sched, prompt=20)
    ops = sched.plan()
    with pytest.raises(ValueError, match="had no op"):
        sched.apply(ops, [Prefilled(seq=0, n_tokens=8), Sampled(seq=1, token=0, eog=False)])


def test_a_prefilled_result_for_a_decode_raises(sched: Scheduler) -> None:
    job = decoding(sched)
    with pytest.raises(ValueError, match="does not match"):
        sched.apply(sched.plan(), [Prefilled(seq=seq_of(job), n_tokens=1)])


# ---- natural finish -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "n_context", "is_eog", "reason"),
    [
        pytest.param(8, 4, True, "stop", id="end-of-generation"),
        pytest.param(1, 4, False, "length", id="max-tokens"),
        pytest.param(None, 63, False, "length", id="full-context"),
        pytest.param(8, 4, False, None, id="carries-on"),
        pytest.param(None, 62, False, None, id="room-left"),
    ],
)
def test_natural_finish(
    sched: Scheduler, max_tokens: int | None, n_context: int, is_eog: bool, reason: str | None
) -> None:
    job = decoding(sched, n_context=n_context, max_tokens=max_tokens)
    (s,) = sched.apply(sched.plan(), [Sampled(seq=seq_of(job), token=1, eog=is_eog)]).sampled
    assert sched.natural_finish(s, is_eog=is_eog) == reason


def test_a_prefill_only_job_is_complete_once_its_prompt_is_in(sched: Scheduler) -> None:
    job = running(sched, prompt=12, max_tokens=0)
    running(sched, prompt=3)  # a generating job is never "prefill complete"
    step_only(sched, job)
    assert sched.prefill_complete() == []
    step_only(sched, job)
    assert sched.prefill_complete() == [job]


# ---- barriers -----------------------------------------------------------------------------


def test_a_barrier_waits_until_nothing_is_admitted(sched: Scheduler) -> None:
    job = running(sched)
    barrier = Barrier()
    sched.submit_barrier(barrier)
    assert sched.admit(lowest) == []
    assert sched.barrier is None
    sched.finish(job, "stop")
    assert sched.admit(lowest) == [barrier]
    assert sched.barrier is barrier


def test_jobs_behind_a_pending_barrier_wait_even_with_free_sequences(sched: Scheduler) -> None:
    ahead = queued(sched)
    sched.submit_barrier(Barrier())
    behind = queued(sched)
    assert sched.admit(lowest) == [ahead]
    assert behind.state is JobState.QUEUED


def test_nothing_queued_behind_a_running_barrier_is_admitted_before_barrier_done(
    sched: Scheduler,
) -> None:
    barrier = Barrier()
    sched.submit_barrier(barrier)
    behind = queued(sched)
    assert sched.admit(lowest) == [barrier]
    assert sched.admit(lowest) == []
    assert behind.state is JobState.QUEUED
    sched.barrier_done()
    assert sched.admit(lowest) == [behind]


def test_a_pinned_session_job_behind_a_barrier_waits_for_it(sched: Scheduler) -> None:
    sched.finish(running(sched, session="s"), "stop", pin=True)
    barrier = Barrier()
    sched.submit_barrier(barrier)
    behind = queued(sched, session="s")
    assert sched.admit(lowest) == [barrier]
    assert sched.admit(lowest) == []
    sched.barrier_done()
    assert sched.admit(lowest) == [behind]


def test_withdraw_barrier_removes_a_pending_one(sched: Scheduler) -> None:
    barrier = Barrier()
    sched.submit_barrier(barrier)
    assert sched.withdraw_barrier(barrier) is True
    assert sched.admit(lowest) == []
    assert sched.barrier is None
    assert not sched.busy


def test_a_started_barrier_cannot_be_withdrawn(sched: Scheduler) -> None:
    barrier = Barrier()
    sched.submit_barrier(barrier)
    sched.admit(lowest)
    assert sched.withdraw_barrier(barrier) is False
    assert sched.barrier is barrier


# ---- sessions -----------------------------------------------------------------------------


def test_finish_with_pin_keeps_the_sequence_for_the_session(sched: Scheduler) -> None:
    job = running(sched, session="s")
    seq = job.seq
    sched.finish(job, "stop", pin=True)
    assert sched.pins == {"s": seq}
    assert seq not in sched.free
    assert sched.admitted == {}


def test_pin_without_a_session_frees_the_sequence(sched: Scheduler) -> None:
    job = running(sched)
    sched.finish(job, "stop", pin=True)
    assert sched.pins == {}
    assert job.seq in sched.free


def test_a_session_job_takes_its_pinned_sequence_without_waiting_behind_others(
    sched: Scheduler,
) -> None:
    first = running(sched, session="s")
    pinned = first.seq
    running(sched)  # holds the other sequence
    sched.finish(first, "stop", pin=True)
    stranger = queued(sched)  # no free sequence: it waits
    again = queued(sched, session="s")
    assert sched.admit(lowest) == [again]
    assert again.seq == pinned
    assert stranger.state is JobState.QUEUED


def test_a_pinned_sequence_is_not_given_to_other_jobs() -> None:
    sched = new_scheduler(n_seq=1)
    sched.finish(running(sched, session="s"), "stop", pin=True)
    stranger = queued(sched)
    assert sched.admit(lowest) == []
    assert stranger.state is JobState.QUEUED


@pytest.mark.parametrize("stage", [queued, admitted, running])
def test_a_second_job_of_a_busy_session_is_refused(sched: Scheduler, stage: Any) -> None:
    stage(sched, session="s")
    with pytest.raises(SessionBusy) as caught:
        queued(sched, session="s")
    assert caught.value.session_id == "s"


def test_a_pinned_idle_session_is_not_busy(sched: Scheduler) -> None:
    sched.finish(running(sched, session="s"), "stop", pin=True)
    queued(sched, session="s")


def test_unpin_frees_the_pinned_sequence(sched: Scheduler) -> None:
    job = running(sched, session="s")
    sched.finish(job, "stop", pin=True)
    assert sched.unpin("s") == job.seq
    assert sched.pins == {}
    assert sched.pinned_seq == {}
    assert job.seq in sched.free


def test_unpin_of_a_session_without_a_pin_returns_none(sched: Scheduler) -> None:
    assert sched.unpin("s") is None
    assert sorted(sched.free) == [0, 1]


def pinned_session_job(sched: Scheduler) -> Job:
    """A running session job on the sequence its session had pinned."""
    sched.finish(running(sched, session="s"), "stop", pin=True)
    job = running(sched, session="s")
    assert job.seq == sched.pins["s"]
    return job


def test_failing_a_session_job_drops_its_pin(sched: Scheduler) -> None:
    job = pinned_session_job(sched)
    sched.fail(job, RuntimeError("boom"))
    assert sched.pins == {}
    assert sched.pinned_seq == {}
    assert job.seq in sched.free


def test_cancelling_a_session_job_drops_its_pin(sched: Scheduler) -> None:
    job = pinned_session_job(sched)
    sched.cancel(job)
    sched.finish(job, "cancelled")
    assert sched.pins == {}
    assert job.seq in sched.free


def test_finishing_a_session_job_with_pin_keeps_its_pin(sched: Scheduler) -> None:
    job = pinned_session_job(sched)
    sched.finish(job, "length", pin=True)
    assert sched.pins == {"s": job.seq}
    assert job.seq not in sched.free


# ---- failure and ending -------------------------------------------------------------------


def test_failing_a_queued_job_takes_it_out_of_the_queue() -> None:
    sched = new_scheduler(n_seq=1)
    running(sched)
    job = queued(sched)
    error = RuntimeError("bad request")
    sched.fail(job, error)
    assert job.outcome is error
    assert not sched.queue


def test_fail_all_ends_every_job_with_the_error() -> None:
    sched = new_scheduler(n_seq=2)
    jobs = [running(sched), admitted(sched), queued(sched)]
    error = RuntimeError("model gone")
    sched.fail_all(error)
    assert all(job.outcome is error for job in jobs)
    assert set(sched.take_ended()) == set(jobs)
    assert not sched.admitted
    assert not sched.queue
    assert sorted(sched.free) == [0, 1]


def test_fail_all_returns_queued_barriers() -> None:
    sched = new_scheduler(n_seq=1)
    running(sched)
    first, second = Barrier(), Barrier()
    sched.submit_barrier(first)
    queued(sched)
    sched.submit_barrier(second)
    assert sched.fail_all(RuntimeError("model gone")) == [first, second]
    assert not sched.queue


def test_a_job_ends_exactly_once(sched: Scheduler) -> None:
    job = running(sched)
    sched.finish(job, "stop")
    with pytest.raises(AssertionError, match="exactly once"):
        sched.finish(job, "stop")
    with pytest.raises(AssertionError, match="exactly once"):
        sched.fail(job, RuntimeError("late"))
    assert sched.take_ended() == [job]
