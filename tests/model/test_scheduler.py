"""The batch scheduler as the model thread and the event loop drive it, one behaviour each.

Every test but the last works on the bare state machine: no backend, no threads. The
helpers below move jobs through the closed contract (add_request -> admit -> start ->
schedule/update_from_output -> finish_request) the way erllama.model.thread does, and read
the scheduler only through its public reads (statistics, job_on, admitted_seqs, pinned,
running) and the jobs' own fields.
"""

from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from erllama.backends.types import (
    Decode,
    Prefill,
    Prefilled,
    SeqFailed,
    StepOp,
    StepResult,
)
from erllama.backends.types import Sampled as SampledResult
from erllama.errors import QueueFull, SessionBusy
from erllama.model.scheduler import (
    Barrier,
    Closed,
    Housekeeping,
    Job,
    JobState,
    Sampled,
    Scheduler,
    SchedulerClosed,
    StepOutputs,
    StepPlan,
)

Sched = Scheduler[str, str]
AJob = Job[str]

LIVE = (JobState.ADMITTING, JobState.RUNNING)

#: The sessions tests use: free_seqs() asks the scheduler for each one's pin.
SESSIONS = ("s", "t")

# ---- helpers ------------------------------------------------------------------------------


def new_scheduler(**overrides: Any) -> Sched:
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
def sched() -> Sched:
    """Two sequences, a batch of 16, prefill slices of 8, a context of 64."""
    return new_scheduler()


def lowest(job: AJob, free: Sequence[int]) -> int:
    return min(free)


def highest(job: AJob, free: Sequence[int]) -> int:
    return max(free)


def queued(
    sched: Sched,
    *,
    max_tokens: int | None = 8,
    session: str | None = None,
    sampler: object = None,
) -> AJob:
    job = Job("request", max_tokens=max_tokens, session=session, sampler=sampler)
    sched.add_request(job)
    return job


def admitted(sched: Sched, **kw: Any) -> AJob:
    """A job that holds a sequence and waits for its prefix (ADMITTING)."""
    job = queued(sched, **kw)
    assert sched.admit(lowest) == [job]
    return job


def running(
    sched: Sched,
    *,
    prompt: int = 4,
    n_context: int = 0,
    pause_at: int | None = None,
    **kw: Any,
) -> AJob:
    """A started job whose sequence holds ``n_context`` tokens of a ``prompt``-token prompt;
    the rest is its cursor."""
    job = admitted(sched, **kw)
    sched.start(job, n_context=n_context, cursor=list(range(n_context, prompt)), pause_at=pause_at)
    return job


def answer(op: StepOp, *, token: int = 0, eog: bool = False) -> StepResult:
    """What a backend returns for ``op`` when it succeeds."""
    if isinstance(op, Prefill):
        return Prefilled(seq=op.seq, n_tokens=len(op.tokens))
    return SampledResult(seq=op.seq, token=token, eog=eog)


def step_only(sched: Sched, job: AJob) -> StepOutputs[str]:
    """Run one step for ``job`` alone (other jobs' ops are left out of the step)."""
    plan = StepPlan(tuple(op for op in sched.schedule().ops if op.seq == job.seq))
    return sched.update_from_output(plan, [answer(op) for op in plan.ops])


def decoding(sched: Sched, *, n_context: int = 4, **kw: Any) -> AJob:
    """A running job whose prompt is in its sequence: its next op is a Decode."""
    job = running(sched, prompt=n_context, n_context=n_context - 1, **kw)
    step_only(sched, job)
    assert not job.feeding
    return job


def seq_of(job: AJob) -> int:
    assert job.seq is not None
    return job.seq


def op_for(ops: Sequence[StepOp], job: AJob) -> StepOp:
    (op,) = (op for op in ops if op.seq == job.seq)
    return op


def slices(plan: StepPlan) -> list[tuple[int, int]]:
    """(seq, token count) of each Prefill, in plan order."""
    return [(op.seq, len(op.tokens)) for op in plan.ops if isinstance(op, Prefill)]


def free_seqs(sched: Sched) -> set[int]:
    """The free sequences: neither admitted nor pinned to a session (checked against the
    scheduler's own count, so a sequence lost or counted twice shows)."""
    pinned = {sched.pinned(s) for s in SESSIONS} - {None}
    free = set(range(sched.n_seq)) - sched.admitted_seqs() - pinned
    assert sched.statistics().free == len(free)
    return free


def pins(sched: Sched) -> dict[str, int]:
    found = {s: sched.pinned(s) for s in SESSIONS}
    out = {s: seq for s, seq in found.items() if seq is not None}
    assert sched.statistics().pinned == len(out)
    return out


# ---- admission and the queue --------------------------------------------------------------


def test_jobs_are_admitted_in_submission_order_while_sequences_are_free(
    sched: Sched,
) -> None:
    first, second, third = (queued(sched) for _ in range(3))
    assert sched.admit(lowest) == [first, second]
    assert first.state is second.state is JobState.ADMITTING
    assert third.state is JobState.QUEUED
    assert sched.statistics().waiting == 1


def test_admission_gives_the_job_the_sequence_choose_picked(sched: Sched) -> None:
    job = queued(sched)
    sched.admit(highest)
    assert job.seq == 1
    assert sched.admitted_seqs() == {1}
    assert sched.job_on(1) is job
    assert sched.job_on(0) is None
    assert free_seqs(sched) == {0}


def test_choose_is_offered_every_free_sequence(sched: Sched) -> None:
    offered: list[tuple[int, ...]] = []

    def spy(job: AJob, free: Sequence[int]) -> int:
        offered.append(tuple(sorted(free)))
        return min(free)

    queued(sched)
    queued(sched)
    sched.admit(spy)
    assert offered == [(0, 1), (1,)]


def test_the_next_queued_job_is_admitted_once_a_sequence_frees(sched: Sched) -> None:
    first = admitted(sched)
    admitted(sched)
    waiting = queued(sched)
    assert sched.admit(lowest) == []
    sched.finish_request(first, "stop")
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
    assert sched.statistics().waiting == 2


def test_a_pinned_sessions_job_is_never_refused_for_a_full_queue() -> None:
    sched = new_scheduler(n_seq=1, max_queue=0)
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    with pytest.raises(QueueFull):
        queued(sched)
    job = queued(sched, session="s")
    assert sched.admit(lowest) == [job]


def test_n_batch_must_hold_a_decode_for_every_sequence() -> None:
    with pytest.raises(ValueError, match="n_batch"):
        new_scheduler(n_seq=4, n_batch=3)


# ---- abort --------------------------------------------------------------------------------


def test_aborting_a_queued_job_ends_it_at_once(sched: Sched) -> None:
    job = queued(sched)
    assert sched.abort(job) is True
    assert job.state is JobState.DONE
    assert job.outcome == "cancelled"
    assert sched.statistics().waiting == 0


def test_an_aborted_queued_job_is_never_admitted() -> None:
    sched = new_scheduler(n_seq=1)
    admitted(sched)
    gone, kept = queued(sched), queued(sched)
    sched.abort(gone)
    assert sched.statistics().waiting == 1
    first = sched.job_on(0)
    assert first is not None
    sched.finish_request(first, "stop")
    assert sched.admit(lowest) == [kept]
    assert gone.seq is None


def test_aborting_an_admitted_job_only_marks_it(sched: Sched) -> None:
    job = running(sched)
    assert sched.abort(job) is False
    assert job.state is JobState.RUNNING
    assert job.cancel_requested
    assert sched.housekeeping().aborted == (job,)
    assert sched.abort(job) is False  # again: still only marked
    assert job.outcome is None


def test_aborting_an_admitting_job_only_marks_it(sched: Sched) -> None:
    job = admitted(sched)
    assert sched.abort(job) is False
    assert job.state is JobState.ADMITTING
    assert sched.housekeeping().aborted == (job,)


def test_a_job_marked_for_abort_gets_no_op(sched: Sched) -> None:
    job = running(sched)
    sched.abort(job)
    plan = sched.schedule()
    assert plan.ops == ()
    assert not plan


def test_a_marked_job_ends_cancelled_when_the_driver_finishes_it(sched: Sched) -> None:
    job = running(sched)
    sched.abort(job)
    sched.finish_request(job, "cancelled")
    assert job.state is JobState.DONE
    assert job.outcome == "cancelled"
    assert sched.housekeeping() == Housekeeping()
    assert job.seq in free_seqs(sched)


def test_aborting_an_ended_job_does_nothing(sched: Sched) -> None:
    job = queued(sched)
    assert sched.abort(job) is True
    assert sched.abort(job) is False
    assert job.outcome == "cancelled"
    finished = running(sched)
    sched.finish_request(finished, "stop")
    assert sched.abort(finished) is False
    assert not finished.cancel_requested
    assert finished.outcome == "stop"


# ---- schedule -----------------------------------------------------------------------------


def test_every_decoding_job_gets_one_decode(sched: Sched) -> None:
    first, second = decoding(sched), decoding(sched)
    ops = sched.schedule().ops
    assert sorted(ops, key=lambda op: op.seq) == [
        Decode(seq=seq_of(first)),
        Decode(seq=seq_of(second)),
    ]


def test_a_decode_carries_the_jobs_sampler_and_greedy_flag(sched: Sched) -> None:
    sampler = object()
    job = decoding(sched, sampler=sampler)
    sched.set_greedy(job, True)
    assert job.greedy is True
    assert sched.schedule() == StepPlan((Decode(seq=seq_of(job), sampler=sampler, greedy=True),))
    sched.set_greedy(job, False)
    assert sched.schedule().ops == (Decode(seq=seq_of(job), sampler=sampler, greedy=False),)


def test_an_empty_plan_is_falsy(sched: Sched) -> None:
    assert not sched.schedule()
    running(sched)
    assert sched.schedule()


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
    a, _b, _c = feeders
    plan = sched.schedule()
    assert op_for(plan.ops, decoder) == Decode(seq=seq_of(decoder))
    # 15 tokens are left after the decode: a whole grid cell (8) to the first feeder; the
    # next would need 8 and 7 are left: it waits, never cut short of its cell.
    assert slices(plan) == [(a.seq, 8)]


def test_a_slice_is_at_most_prefill_chunk_tokens(sched: Sched) -> None:
    job = running(sched, prompt=30)
    assert slices(sched.schedule()) == [(job.seq, 8)]


def test_a_slice_feeds_the_cursor_from_its_start_to_the_next_grid_point(sched: Sched) -> None:
    job = running(sched, prompt=30, n_context=10)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    # Chunks lie on the grid of absolute positions (G = 8): [10, 16), then [16, 24) ...
    assert list(op.tokens) == list(range(10, 16))
    step_only(sched, job)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(16, 24))


def test_padded_chunks_are_cut_from_where_feeding_starts() -> None:
    # A backend that pads short chunks (pad_rows 8 of a 64-cell context): chunks of G from
    # the restore point, [10, 18), [18, 26) ... not back onto the grid first.
    sched = new_scheduler(pad_zone=57)
    job = running(sched, prompt=30, n_context=10)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(10, 18))
    step_only(sched, job)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(18, 26))


def test_a_batch_invariant_backend_gets_chunks_cut_from_where_feeding_starts() -> None:
    # Every cell computed alike in any chunk: chunks of G from the restore point, up to the
    # end of the context, where the grid would first feed [10, 16).
    sched = new_scheduler(batch_invariant=True)
    job = running(sched, prompt=62, n_context=50)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(50, 58))
    step_only(sched, job)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(58, 62))
    grid = new_scheduler()
    job = running(grid, prompt=62, n_context=50)
    op = op_for(grid.schedule().ops, job)
    assert isinstance(op, Prefill) and list(op.tokens) == list(range(50, 56))


def test_padded_chunks_never_straddle_the_point_where_fillers_stop_fitting() -> None:
    # Context 64, pad_rows 8: from cell 57 on there is no room for fillers, so a chunk
    # stops there and the next one starts there, whatever point feeding started from.
    sched = new_scheduler(pad_zone=57)
    job = running(sched, prompt=62, n_context=52)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(52, 57))
    step_only(sched, job)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert list(op.tokens) == list(range(57, 62))


def test_feeding_never_goes_past_the_pause_point(sched: Sched) -> None:
    job = running(sched, prompt=30, pause_at=5)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert len(op.tokens) == 5
    assert op.logits is False


def test_a_pause_point_at_or_before_the_restored_context_is_dropped(sched: Sched) -> None:
    job = running(sched, prompt=30, n_context=16, pause_at=16)
    assert job.pause_at is None
    assert slices(sched.schedule()) == [(job.seq, 8)]


def test_a_paused_job_gets_no_op_until_the_driver_resumes_it(sched: Sched) -> None:
    job = running(sched, prompt=30, pause_at=5)
    step_only(sched, job)
    assert job.paused
    assert not sched.schedule()
    assert sched.housekeeping().paused == (job,)
    sched.resume(job)  # the driver made its cold save
    assert not job.paused
    assert sched.housekeeping() == Housekeeping()
    assert slices(sched.schedule()) == [(job.seq, 3)]  # back onto the grid: [5, 8)


def test_logits_only_on_the_last_token_of_the_cursor(sched: Sched) -> None:
    job = running(sched, prompt=12)
    first = op_for(sched.schedule().ops, job)
    assert isinstance(first, Prefill)
    assert (len(first.tokens), first.logits) == (8, False)
    step_only(sched, job)
    last = op_for(sched.schedule().ops, job)
    assert isinstance(last, Prefill)
    assert (len(last.tokens), last.logits) == (4, True)


def test_a_prefill_only_job_never_asks_for_logits(sched: Sched) -> None:
    job = running(sched, prompt=3, max_tokens=0)
    op = op_for(sched.schedule().ops, job)
    assert isinstance(op, Prefill)
    assert len(op.tokens) == 3
    assert op.logits is False


def test_a_prefill_only_job_gets_no_decode_once_its_prompt_is_in(sched: Sched) -> None:
    job = running(sched, prompt=3, max_tokens=0)
    step_only(sched, job)
    assert not sched.schedule()


def test_an_admitting_job_gets_no_op(sched: Sched) -> None:
    admitted(sched)
    assert not sched.schedule()


def test_a_short_prompt_admitted_while_a_long_one_feeds_gets_its_whole_prompt_next_step(
    sched: Sched,
) -> None:
    long = running(sched, prompt=100)
    step_only(sched, long)
    short = running(sched, prompt=5)
    plan = sched.schedule()
    # Shortest remaining first: the short prompt is fed whole, the long one takes the rest.
    assert slices(plan) == [(short.seq, 5), (long.seq, 8)]
    assert op_for(plan.ops, short) == Prefill(
        seq=seq_of(short), tokens=(0, 1, 2, 3, 4), logits=True
    )


def test_a_long_prompt_does_not_starve_a_short_one_when_its_chunk_fills_the_batch() -> None:
    # prefill_chunk == n_batch is what EngineConfig.effective_prefill_chunk gives for any
    # n_batch <= 64. The schedule() docstring (and EngineConfig.prefill_chunk's) promises that
    # a short request arriving while a long prompt prefills gets in after one chunk, not
    # after the whole prompt.
    sched = new_scheduler(n_seq=2, n_batch=8, prefill_chunk=8)
    long = running(sched, prompt=100)
    step_only(sched, long)
    short = running(sched, prompt=3)
    assert any(op.seq == short.seq for op in sched.schedule().ops)


def test_feeders_are_served_shortest_remaining_first() -> None:
    sched = new_scheduler(n_seq=3, n_batch=10, prefill_chunk=8)
    long = running(sched, prompt=40)
    mid = running(sched, prompt=6)
    short = running(sched, prompt=2)
    # 2 + 6 fit; the long prompt's first cell (8) does not fit the 2 left: it waits.
    assert slices(sched.schedule()) == [(short.seq, 2), (mid.seq, 6)]
    assert long.seq not in {op.seq for op in sched.schedule().ops}


def test_a_decoder_is_never_starved_by_feeders() -> None:
    sched = new_scheduler(n_seq=3, n_batch=3, prefill_chunk=8)
    # The feeders are admitted before the decoder, and feed only once it decodes.
    first, second = admitted(sched), admitted(sched)
    decoder = decoding(sched)
    for job in (first, second):
        sched.start(job, n_context=0, cursor=list(range(50)), pause_at=None)
    plan = sched.schedule()
    assert op_for(plan.ops, decoder) == Decode(seq=seq_of(decoder))
    # A step's first chunk goes even past the batch (whole cells only, and nothing starves);
    # the second waits.
    assert slices(plan) == [(first.seq, 8)]
    assert second.seq not in {op.seq for op in plan.ops}


# ---- update_from_output -------------------------------------------------------------------


def test_prefilled_advances_the_cursor_and_the_context(sched: Sched) -> None:
    job = running(sched, prompt=20, n_context=2)
    out = sched.update_from_output(sched.schedule(), [Prefilled(seq=seq_of(job), n_tokens=6)])
    assert job.cursor == list(range(8, 20))
    assert job.n_context == 8
    assert out == StepOutputs(fed=((job, tuple(range(2, 8))),))


def test_sampled_counts_one_more_token_and_is_returned(sched: Sched) -> None:
    job = decoding(sched, n_context=4)
    out = sched.update_from_output(
        sched.schedule(), [SampledResult(seq=seq_of(job), token=42, eog=True)]
    )
    assert (job.n_context, job.n_generated) == (5, 1)
    assert out == StepOutputs(sampled=(Sampled(job, 42, True, "stop"),))


def test_a_failed_op_is_returned_as_failed_and_leaves_the_job_as_it_was(
    sched: Sched,
) -> None:
    job = running(sched, prompt=20)
    error = RuntimeError("sampler broke")
    out = sched.update_from_output(sched.schedule(), [SeqFailed(seq=seq_of(job), error=error)])
    assert out == StepOutputs(failed=((job, error),))
    assert (job.n_context, len(job.cursor), job.state) == (0, 20, JobState.RUNNING)


def test_results_may_come_back_in_any_order(sched: Sched) -> None:
    feeder = running(sched, prompt=20)
    decoder = decoding(sched)
    plan = sched.schedule()
    out = sched.update_from_output(plan, [answer(op, token=5) for op in reversed(plan.ops)])
    assert out.fed == ((feeder, tuple(range(8))),)
    assert out.sampled == (Sampled(decoder, 5, False, None),)


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
            [Prefilled(seq=0, n_tokens=8), SampledResult(seq=1, token=0, eog=False)],
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
    sched: Sched, results: list[StepResult], match: str
) -> None:
    running(sched, prompt=20)
    running(sched, prompt=4)
    plan = sched.schedule()
    assert sorted(slices(plan)) == [(0, 8), (1, 4)]
    with pytest.raises(ValueError, match=match):
        sched.update_from_output(plan, results)


def test_a_result_for_a_sequence_without_an_op_raises(sched: Sched) -> None:
    running(sched, prompt=20)
    plan = sched.schedule()
    with pytest.raises(ValueError, match="had no op"):
        sched.update_from_output(
            plan, [Prefilled(seq=0, n_tokens=8), SampledResult(seq=1, token=0, eog=False)]
        )


def test_a_prefilled_result_for_a_decode_raises(sched: Sched) -> None:
    job = decoding(sched)
    with pytest.raises(ValueError, match="does not match"):
        sched.update_from_output(sched.schedule(), [Prefilled(seq=seq_of(job), n_tokens=1)])


# ---- natural ends -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "n_context", "eog", "reason"),
    [
        pytest.param(8, 4, True, "stop", id="end-of-generation"),
        pytest.param(1, 4, False, "length", id="max-tokens"),
        pytest.param(1, 4, True, "stop", id="end-of-generation-before-max-tokens"),
        pytest.param(None, 63, False, "length", id="full-context"),
        pytest.param(None, 63, True, "stop", id="end-of-generation-before-full-context"),
        pytest.param(8, 4, False, None, id="carries-on"),
        pytest.param(None, 62, False, None, id="room-left"),
    ],
)
def test_a_sampled_token_brings_its_natural_end(
    sched: Sched, max_tokens: int | None, n_context: int, eog: bool, reason: str | None
) -> None:
    job = decoding(sched, n_context=n_context, max_tokens=max_tokens)
    result = SampledResult(seq=seq_of(job), token=1, eog=eog)
    (s,) = sched.update_from_output(sched.schedule(), [result]).sampled
    assert (s.job, s.token, s.eog, s.finish) == (job, 1, eog, reason)
    # The scheduler decides; the job stays the driver's to end.
    assert job.state is JobState.RUNNING


def test_a_token_in_eog_ends_generation_though_the_backend_did_not_flag_it(
    sched: Sched,
) -> None:
    job = decoding(sched)
    result = SampledResult(seq=seq_of(job), token=7, eog=False)
    (s,) = sched.update_from_output(sched.schedule(), [result], eog=frozenset({7})).sampled
    assert (s.eog, s.finish) == (True, "stop")


def test_max_tokens_counts_every_sampled_token(sched: Sched) -> None:
    job = decoding(sched, max_tokens=3)
    finishes = []
    for _ in range(3):
        plan = sched.schedule()
        (s,) = sched.update_from_output(plan, [answer(op) for op in plan.ops]).sampled
        finishes.append(s.finish)
    assert finishes == [None, None, "length"]
    assert job.n_generated == 3


def test_a_prefill_only_job_is_complete_once_its_prompt_is_in(sched: Sched) -> None:
    job = running(sched, prompt=12, max_tokens=0)
    running(sched, prompt=3)  # a generating job is never "prefilled"
    step_only(sched, job)
    assert sched.housekeeping().prefilled == ()
    step_only(sched, job)
    assert sched.housekeeping() == Housekeeping(prefilled=(job,))


# ---- housekeeping and insert --------------------------------------------------------------


def test_housekeeping_of_an_idle_scheduler_has_nothing_to_do(sched: Sched) -> None:
    assert sched.housekeeping() == Housekeeping()
    admitted(sched)
    running(sched)
    assert sched.housekeeping() == Housekeeping()


def test_an_aborted_job_is_neither_prefilled_nor_paused(sched: Sched) -> None:
    prefilled = running(sched, prompt=3, max_tokens=0)
    paused = running(sched, prompt=30, pause_at=4)
    step_only(sched, prefilled)
    step_only(sched, paused)
    assert sched.housekeeping() == Housekeeping(prefilled=(prefilled,), paused=(paused,))
    sched.abort(prefilled)
    sched.abort(paused)
    todo = sched.housekeeping()
    assert set(todo.aborted) == {prefilled, paused}
    assert (todo.prefilled, todo.paused) == ((), ())


def test_inserted_tokens_are_fed_before_the_next_decode(sched: Sched) -> None:
    job = decoding(sched)
    assert sched.insert(job, [90, 91]) is True
    assert job.feeding
    plan = sched.schedule()
    assert plan.ops == (Prefill(seq=seq_of(job), tokens=(90, 91), logits=True),)
    out = sched.update_from_output(plan, [answer(plan.ops[0])])
    assert out.fed == ((job, (90, 91)),)
    assert (job.n_context, job.n_generated) == (6, 0)
    assert isinstance(sched.schedule().ops[0], Decode)


def test_insert_refuses_tokens_that_leave_no_room_for_one_more(sched: Sched) -> None:
    job = decoding(sched, n_context=60)
    assert sched.insert(job, [1, 2, 3, 4]) is False
    assert job.cursor == []
    assert sched.insert(job, [1, 2, 3]) is True  # 60 + 3 + 1 == n_ctx
    assert job.cursor == [1, 2, 3]


# ---- barriers -----------------------------------------------------------------------------


def test_a_barrier_waits_until_nothing_is_admitted(sched: Sched) -> None:
    job = running(sched)
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    assert sched.admit(lowest) == []
    assert sched.statistics().barriers == 1
    sched.finish_request(job, "stop")
    assert sched.admit(lowest) == [barrier]
    stats = sched.statistics()
    assert (stats.barriers, stats.busy, stats.running) == (1, True, 0)


def test_jobs_behind_a_pending_barrier_wait_even_with_free_sequences(sched: Sched) -> None:
    ahead = queued(sched)
    sched.add_barrier(Barrier("adapter"))
    behind = queued(sched)
    assert sched.admit(lowest) == [ahead]
    assert behind.state is JobState.QUEUED


def test_nothing_queued_behind_a_running_barrier_is_admitted_before_barrier_done(
    sched: Sched,
) -> None:
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    behind = queued(sched)
    assert sched.admit(lowest) == [barrier]
    assert sched.admit(lowest) == []
    assert behind.state is JobState.QUEUED
    sched.barrier_done()
    assert sched.statistics().barriers == 0
    assert sched.admit(lowest) == [behind]


def test_a_pinned_session_job_behind_a_barrier_waits_for_it(sched: Sched) -> None:
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    behind = queued(sched, session="s")
    assert sched.admit(lowest) == [barrier]
    assert sched.admit(lowest) == []
    sched.barrier_done()
    assert sched.admit(lowest) == [behind]


def test_withdraw_barrier_removes_a_pending_one(sched: Sched) -> None:
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    assert sched.withdraw_barrier(barrier) is True
    assert sched.admit(lowest) == []
    stats = sched.statistics()
    assert (stats.barriers, stats.busy) == (0, False)


def test_a_started_barrier_cannot_be_withdrawn(sched: Sched) -> None:
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    sched.admit(lowest)
    assert sched.withdraw_barrier(barrier) is False
    assert sched.statistics().barriers == 1


# ---- sessions -----------------------------------------------------------------------------


def test_finish_with_pin_keeps_the_sequence_for_the_session(sched: Sched) -> None:
    job = running(sched, session="s")
    seq = job.seq
    sched.finish_request(job, "stop", pin=True)
    assert pins(sched) == {"s": seq}
    assert seq not in free_seqs(sched)
    assert sched.admitted_seqs() == frozenset()


def test_pin_without_a_session_frees_the_sequence(sched: Sched) -> None:
    job = running(sched)
    sched.finish_request(job, "stop", pin=True)
    assert pins(sched) == {}
    assert job.seq in free_seqs(sched)


def test_a_session_job_takes_its_pinned_sequence_without_waiting_behind_others(
    sched: Sched,
) -> None:
    first = running(sched, session="s")
    pinned = first.seq
    running(sched)  # holds the other sequence
    sched.finish_request(first, "stop", pin=True)
    stranger = queued(sched)  # no free sequence: it waits
    again = queued(sched, session="s")
    assert sched.admit(lowest) == [again]
    assert again.seq == pinned
    assert stranger.state is JobState.QUEUED


def test_a_pinned_sequence_is_not_given_to_other_jobs() -> None:
    sched = new_scheduler(n_seq=1)
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    stranger = queued(sched)
    assert sched.admit(lowest) == []
    assert stranger.state is JobState.QUEUED


@pytest.mark.parametrize("stage", [queued, admitted, running])
def test_a_second_job_of_a_busy_session_is_refused(sched: Sched, stage: Any) -> None:
    stage(sched, session="s")
    with pytest.raises(SessionBusy) as caught:
        queued(sched, session="s")
    assert caught.value.session_id == "s"


def test_a_pinned_idle_session_is_not_busy(sched: Sched) -> None:
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    queued(sched, session="s")


def test_unpin_frees_the_pinned_sequence(sched: Sched) -> None:
    job = running(sched, session="s")
    sched.finish_request(job, "stop", pin=True)
    assert sched.unpin("s") == job.seq
    assert pins(sched) == {}
    assert job.seq in free_seqs(sched)


def test_unpin_of_a_session_without_a_pin_returns_none(sched: Sched) -> None:
    assert sched.unpin("s") is None
    assert free_seqs(sched) == {0, 1}


def pinned_session_job(sched: Sched) -> AJob:
    """A running session job on the sequence its session had pinned."""
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    job = running(sched, session="s")
    assert job.seq == sched.pinned("s")
    return job


def test_unpin_of_a_session_whose_job_runs_on_its_pin_keeps_the_pin(sched: Sched) -> None:
    job = pinned_session_job(sched)
    assert sched.unpin("s") is None
    assert pins(sched) == {"s": job.seq}
    assert job.seq not in free_seqs(sched)


def test_failing_a_session_job_drops_its_pin(sched: Sched) -> None:
    job = pinned_session_job(sched)
    sched.fail(job, RuntimeError("boom"))
    assert pins(sched) == {}
    assert job.seq in free_seqs(sched)


def test_aborting_a_session_job_drops_its_pin(sched: Sched) -> None:
    job = pinned_session_job(sched)
    sched.abort(job)
    sched.finish_request(job, "cancelled")
    assert pins(sched) == {}
    assert job.seq in free_seqs(sched)


def test_finishing_a_session_job_with_pin_keeps_its_pin(sched: Sched) -> None:
    job = pinned_session_job(sched)
    sched.finish_request(job, "length", pin=True)
    assert pins(sched) == {"s": job.seq}
    assert job.seq not in free_seqs(sched)


# ---- starved ------------------------------------------------------------------------------


def test_starved_when_a_queued_job_waits_and_only_idle_pins_hold_sequences() -> None:
    sched = new_scheduler(n_seq=1)
    assert not sched.starved()
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    assert not sched.starved()  # nothing waits
    queued(sched)
    assert sched.starved()
    sched.unpin("s")
    assert not sched.starved()


def test_not_starved_while_a_sequence_is_free(sched: Sched) -> None:
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    first = queued(sched)
    assert not sched.starved()  # sequence 1 is free for it
    assert sched.admit(lowest) == [first]
    queued(sched)
    # The other sequence is admitted now, and the pin is idle: starved.
    assert sched.starved()


def test_not_starved_by_a_queued_job_of_the_pinned_session() -> None:
    sched = new_scheduler(n_seq=1)
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    queued(sched, session="s")
    assert not sched.starved()


def test_not_starved_while_a_barrier_runs() -> None:
    sched = new_scheduler(n_seq=1)
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    sched.add_barrier(Barrier("adapter"))
    sched.admit(lowest)
    queued(sched)
    assert not sched.starved()
    sched.barrier_done()
    assert sched.starved()


def test_not_starved_when_every_pinned_sequence_runs_its_own_sessions_job() -> None:
    sched = new_scheduler(n_seq=1)
    job = pinned_session_job(sched)
    queued(sched)
    assert sched.unpin("s") is None  # nothing an unpin could free
    assert job.state is JobState.RUNNING
    assert not sched.starved()


# ---- statistics and reads -----------------------------------------------------------------


def test_statistics_follow_the_phase_of_the_admitted_jobs(sched: Sched) -> None:
    stats = sched.statistics()
    assert (stats.phase, stats.busy, stats.n_seq, stats.free) == ("idle", False, 2, 2)
    queued(sched)
    assert (sched.statistics().phase, sched.statistics().busy) == ("idle", True)
    (job,) = sched.admit(lowest)
    assert isinstance(job, Job)
    assert sched.statistics().phase == "prefilling"  # admitting
    sched.start(job, n_context=0, cursor=[1, 2], pause_at=None)
    assert sched.statistics().phase == "prefilling"  # feeding
    step_only(sched, job)
    stats = sched.statistics()
    assert (stats.phase, stats.running, stats.waiting, stats.free) == ("generating", 1, 0, 1)


def test_running_lists_only_started_jobs(sched: Sched) -> None:
    starting = admitted(sched)
    started = running(sched)
    assert sched.running() == [started]
    assert sched.admitted_seqs() == {seq_of(starting), seq_of(started)}


# ---- close --------------------------------------------------------------------------------


def test_close_without_an_error_cancels_queued_jobs_and_leaves_admitted_ones() -> None:
    sched = new_scheduler(n_seq=2)
    live = [running(sched), admitted(sched)]
    first, second = queued(sched), queued(sched)
    barrier = Barrier("adapter")
    sched.add_barrier(barrier)
    closed = sched.close()
    assert closed == Closed(jobs=(first, second), barriers=(barrier,))
    assert first.outcome == second.outcome == "cancelled"
    assert [j.state for j in live] == [JobState.RUNNING, JobState.ADMITTING]
    stats = sched.statistics()
    assert (stats.waiting, stats.running, stats.barriers) == (0, 2, 0)


def test_after_close_admitted_jobs_run_until_the_driver_ends_them() -> None:
    sched = new_scheduler(n_seq=2)
    job = running(sched, prompt=3, max_tokens=1)
    starting = admitted(sched)
    sched.close()
    sched.start(starting, n_context=0, cursor=[1], pause_at=None)
    assert sched.abort(starting) is False
    step_only(sched, job)
    (s,) = step_only(sched, job).sampled
    assert s.finish == "length"
    sched.finish_request(job, "length")
    assert sched.housekeeping() == Housekeeping(aborted=(starting,))
    sched.finish_request(starting, "cancelled")
    stats = sched.statistics()
    assert (stats.busy, stats.free) == (False, 2)


def test_after_close_nothing_new_is_queued_or_admitted() -> None:
    sched = new_scheduler(n_seq=1)
    sched.finish_request(running(sched, session="s"), "stop", pin=True)
    sched.close()
    with pytest.raises(SchedulerClosed):
        queued(sched)
    with pytest.raises(SchedulerClosed):
        queued(sched, session="s")
    with pytest.raises(SchedulerClosed):
        sched.add_barrier(Barrier("adapter"))
    assert sched.admit(lowest) == []
    assert sched.statistics().busy is False
    assert sched.close() == Closed()


def test_close_leaves_a_running_barrier_to_its_driver() -> None:
    sched = new_scheduler(n_seq=1)
    running_barrier, queued_barrier = Barrier("running"), Barrier("queued")
    sched.add_barrier(running_barrier)
    sched.admit(lowest)
    sched.add_barrier(queued_barrier)
    assert sched.close() == Closed(barriers=(queued_barrier,))
    assert sched.withdraw_barrier(queued_barrier) is False
    assert sched.statistics().barriers == 1
    sched.barrier_done()
    assert sched.statistics().busy is False


def test_failing_a_queued_job_takes_it_out_of_the_queue() -> None:
    sched = new_scheduler(n_seq=1)
    running(sched)
    job = queued(sched)
    error = RuntimeError("bad request")
    sched.fail(job, error)
    assert job.outcome is error
    assert sched.statistics().waiting == 0


def test_close_with_an_error_ends_every_job_with_it() -> None:
    sched = new_scheduler(n_seq=2)
    live = [running(sched), admitted(sched)]
    waiting = queued(sched)
    error = RuntimeError("model gone")
    closed = sched.close(error)
    assert set(closed.jobs[:2]) == set(live)
    assert closed.jobs[2:] == (waiting,)
    assert all(job.outcome is error for job in [*live, waiting])
    assert all(job.state is JobState.DONE for job in [*live, waiting])
    assert sched.admitted_seqs() == frozenset()
    stats = sched.statistics()
    assert (stats.waiting, stats.running, stats.busy) == (0, 0, False)
    assert free_seqs(sched) == {0, 1}


def test_close_with_an_error_drops_the_pin_of_a_running_session_job() -> None:
    sched = new_scheduler(n_seq=2)
    sched.finish_request(running(sched, session="t"), "stop", pin=True)
    job = pinned_session_job(sched)
    sched.close(RuntimeError("model gone"))
    assert job.outcome is not None
    assert pins(sched) == {"t": 0}  # an idle session's pin is the driver's to release
    assert free_seqs(sched) == {1}


def test_close_with_an_error_returns_queued_barriers() -> None:
    sched = new_scheduler(n_seq=1)
    running(sched)
    first, second = Barrier("first"), Barrier("second")
    sched.add_barrier(first)
    queued(sched)
    sched.add_barrier(second)
    assert sched.close(RuntimeError("model gone")).barriers == (first, second)
    assert sched.statistics().barriers == 0


# ---- a job ends exactly once --------------------------------------------------------------


def test_a_job_ends_exactly_once(sched: Sched) -> None:
    job = running(sched)
    sched.finish_request(job, "stop")
    with pytest.raises(RuntimeError, match="exactly once"):
        sched.finish_request(job, "stop")
    with pytest.raises(RuntimeError, match="exactly once"):
        sched.finish_request(job, "cancelled", pin=True)
    with pytest.raises(RuntimeError, match="exactly once"):
        sched.fail(job, RuntimeError("late"))
    assert job.outcome == "stop"
    assert free_seqs(sched) == {0, 1}


def test_a_job_aborted_in_the_queue_cannot_end_again(sched: Sched) -> None:
    job = queued(sched)
    sched.abort(job)
    with pytest.raises(RuntimeError, match="exactly once"):
        sched.fail(job, RuntimeError("late"))
    with pytest.raises(RuntimeError, match="exactly once"):
        sched.finish_request(job, "stop")
    assert job.outcome == "cancelled"


def test_ending_a_done_job_does_not_touch_the_sequence_it_held(sched: Sched) -> None:
    old = running(sched, session="s")
    sched.finish_request(old, "stop")
    new = running(sched, session="s")
    assert new.seq == old.seq
    with pytest.raises(RuntimeError):
        sched.finish_request(old, "stop", pin=True)
    assert sched.job_on(seq_of(new)) is new
    assert pins(sched) == {}


@pytest.mark.parametrize("stage", [queued, running])
def test_start_of_a_job_that_is_not_admitting_raises(sched: Sched, stage: Any) -> None:
    job = stage(sched)
    before = (job.state, job.n_context, list(job.cursor))
    with pytest.raises(RuntimeError, match="start"):
        sched.start(job, n_context=1, cursor=[5], pause_at=None)
    assert (job.state, job.n_context, job.cursor) == before


def test_start_of_an_ended_job_raises(sched: Sched) -> None:
    job = admitted(sched)
    sched.abort(job)
    sched.finish_request(job, "cancelled")
    with pytest.raises(RuntimeError, match="start"):
        sched.start(job, n_context=0, cursor=[5], pause_at=None)
    assert job.state is JobState.DONE


def test_finish_request_of_a_queued_job_raises_and_leaves_it_queued(sched: Sched) -> None:
    job = queued(sched)
    with pytest.raises(RuntimeError):
        sched.finish_request(job, "stop")
    assert job.state is JobState.QUEUED
    assert sched.admit(lowest) == [job]


def _readd_after_abort(sched: Sched) -> AJob:
    job = queued(sched)
    sched.abort(job)
    return job


@pytest.mark.parametrize("stage", [_readd_after_abort, queued], ids=["ended", "queued"])
def test_add_request_of_a_job_already_seen_raises(sched: Sched, stage: Any) -> None:
    job = stage(sched)
    with pytest.raises(RuntimeError):
        sched.add_request(job)
    assert len(sched.admit(lowest)) <= 1
    assert free_seqs(sched) | sched.admitted_seqs() == {0, 1}


# ---- two threads at once ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_event_loop_and_the_model_thread_may_call_in_at_any_time() -> None:
    """The loop side (add_request, abort, statistics) hammers the scheduler from a second
    thread while this one drives it like the model thread; afterwards every job has ended
    exactly once, by whoever's call ended it, and every sequence is back."""
    sched = new_scheduler(n_seq=3, n_batch=8, prefill_chunk=4, n_ctx=256, max_queue=6)
    n_ops = 2_000
    added: list[AJob] = []  # the loop thread's only
    ended_by_loop: list[AJob] = []  # the loop thread's only
    ended_here: list[AJob] = []
    aborted_admitted: list[AJob] = []
    failures: list[BaseException] = []
    loop_done = threading.Event()
    stepped = threading.Event()
    abandoned = threading.Event()  # this thread failed: the loop thread stops too

    def loop() -> None:
        rng = random.Random(7)
        try:
            for i in range(n_ops):
                if abandoned.is_set():
                    return
                if i % 20 == 0:
                    # Now and then wait for the model thread to take a round, so that it
                    # does not sit out the whole run: some jobs run while others are added.
                    stepped.clear()
                    assert stepped.wait(timeout=10), "the model thread stopped stepping"
                kind = rng.choices(("add", "abort", "read"), weights=(3, 1, 2))[0]
                if kind == "add":
                    job = Job(
                        f"r{i}",
                        max_tokens=rng.choice([0, 1, 40, None]),
                        session=rng.choice([None, None, "s", "t"]),
                    )
                    try:
                        sched.add_request(job)
                    except (QueueFull, SessionBusy):
                        continue
                    added.append(job)
                elif kind == "abort" and added:
                    # Half the time one that holds a sequence (marked, ended between steps),
                    # else a recent one (most likely queued: ended at once). Either may end
                    # meanwhile, and then the abort does nothing.
                    held = [j for j in added[-40:] if j.state in LIVE]
                    job = rng.choice(held if held and rng.random() < 0.5 else added[-6:])
                    if sched.abort(job):
                        ended_by_loop.append(job)
                else:
                    stats = sched.statistics()
                    assert stats.free + stats.running <= stats.n_seq
                    assert stats.free + stats.pinned <= stats.n_seq
                    assert stats.waiting >= 0
        except BaseException as exc:
            failures.append(exc)
        finally:
            loop_done.set()

    def finish(job: AJob, reason: Any) -> None:
        pin = job.state is JobState.RUNNING and job.session is not None and rng.random() < 0.5
        sched.finish_request(job, reason, pin=pin)
        ended_here.append(job)

    rng = random.Random(11)
    thread = threading.Thread(target=loop, name="loop", daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter will
    try:
        thread.start()
        rounds = 0
        while not loop_done.is_set() or sched.statistics().busy:
            rounds += 1
            assert rounds < 200_000, "the model thread never drained the scheduler"
            stepped.set()
            todo = sched.housekeeping()
            for job in todo.aborted:
                finish(job, "cancelled")
                aborted_admitted.append(job)
            for job in todo.prefilled:
                finish(job, "stop")
            for job in todo.paused:
                sched.resume(job)
            if sched.starved():
                for session in ("s", "t"):
                    if sched.unpin(session) is not None:
                        break
            for item in sched.admit(lowest):
                assert isinstance(item, Job)
                if not item.cancel_requested:
                    prompt = rng.randrange(1, 30)
                    pause_at = rng.choice([None, rng.randrange(1, prompt + 1)])
                    sched.start(item, n_context=0, cursor=range(prompt), pause_at=pause_at)
            plan = sched.schedule()
            if not plan:
                continue
            results = [answer(op, token=rng.randrange(100)) for op in plan.ops]
            if rng.randrange(40) == 0:
                op = rng.choice(plan.ops)
                results = [
                    SeqFailed(seq=op.seq, error=RuntimeError("op")) if r.seq == op.seq else r
                    for r in results
                ]
            out = sched.update_from_output(plan, results, eog=frozenset({0}))
            for job, error in out.failed:
                sched.fail(job, error)
                ended_here.append(job)
            for s in out.sampled:
                if s.finish is not None and not s.job.cancel_requested:
                    finish(s.job, s.finish)
        thread.join(timeout=30)
    finally:
        sys.setswitchinterval(interval)
        abandoned.set()
        stepped.set()
    assert not thread.is_alive()
    assert failures == []

    ends = Counter(ended_by_loop) + Counter(ended_here)
    assert set(ends) == set(added)
    assert all(n == 1 for n in ends.values()), "a job ended twice"
    assert all(job.state is JobState.DONE and job.outcome is not None for job in added)
    assert all(job.outcome == "cancelled" and job.seq is None for job in ended_by_loop)
    stats = sched.statistics()
    assert (stats.waiting, stats.running, stats.busy) == (0, 0, False)
    assert stats.free + stats.pinned == stats.n_seq
    assert stats.free == len(free_seqs(sched))
    # Both sides did real work: aborts hit queued and admitted jobs, and jobs ran to an end.
    assert len(added) > 100
    assert ended_by_loop and aborted_admitted and len(ended_here) > len(aborted_admitted)
