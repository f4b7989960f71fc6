"""The scheduler driven at random the way the model thread and the event loop drive it,
checking the invariants the scheduler's module docstring promises after every call."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from erllama.backends.types import Decode, Prefill, Prefilled, Sampled, SeqFailed, StepResult
from erllama.errors import QueueFull, SessionBusy
from erllama.model.scheduler import Barrier, FinishReason, Job, JobState, Scheduler

N_CTX = 16
#: max_tokens (None: until eog or a full context; 0: prefill only), prompt length, session.
REQUESTS = st.tuples(
    st.none() | st.integers(0, 8),
    st.integers(1, N_CTX - 1),
    st.sampled_from([None, None, "a", "b"]),
)
LIVE = (JobState.ADMITTING, JobState.RUNNING)


def counts(job: Job) -> tuple[int, int]:
    return job.n_context, job.n_generated


def seq_of(job: Job) -> int:
    assert job.seq is not None
    return job.seq


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler | None = None
        self.numbers = itertools.count()
        #: Submission number of every job and barrier that entered the queue.
        self.order: dict[Job | Barrier, int] = {}
        self.jobs: list[Job] = []
        self.prompt: dict[Job, int] = {}
        self.pending: list[Barrier] = []
        self.running_barrier: Barrier | None = None
        self.reported: Counter[Job] = Counter()
        self.stopped = False

    @property
    def s(self) -> Scheduler:
        assert self.sched is not None
        return self.sched

    def _enqueued(self, item: Job | Barrier) -> None:
        self.order[item] = next(self.numbers)

    # ---- the loop's side ------------------------------------------------------------------

    @initialize(
        n_seq=st.integers(1, 4),
        spare=st.integers(0, 8),
        chunk=st.integers(1, 12),
        max_queue=st.integers(0, 6),
    )
    def configure(self, n_seq: int, spare: int, chunk: int, max_queue: int) -> None:
        self.sched = Scheduler(
            model_id="m",
            n_seq=n_seq,
            n_batch=n_seq + spare,
            prefill_chunk=chunk,
            n_ctx=N_CTX,
            max_queue=max_queue,
        )

    @rule(requests=st.lists(REQUESTS, min_size=1, max_size=4))
    def submit(self, requests: list[tuple[int | None, int, str | None]]) -> None:
        if self.stopped:
            return  # the model is gone: nobody submits any more
        for max_tokens, prompt, session in requests:
            self._submit(max_tokens, prompt, session)

    def _busy(self, session: str | None) -> bool:
        """The session has a job queued or admitted (the model's own view, not the scheduler's)."""
        return session is not None and any(
            j.session == session and j.state is not JobState.DONE for j in self.jobs
        )

    def _idle_pinned(self) -> list[str]:
        return sorted(session for session in self.s.pins if not self._busy(session))

    @precondition(lambda self: bool(self._idle_pinned()))
    @rule(data=st.data(), request=REQUESTS)
    def resume_session(
        self, data: st.DataObject, request: tuple[int | None, int, str | None]
    ) -> None:
        """A pinned session's next request."""
        if self.stopped:
            return
        max_tokens, prompt, _ = request
        self._submit(max_tokens, prompt, data.draw(st.sampled_from(self._idle_pinned())))

    def _submit(self, max_tokens: int | None, prompt: int, session: str | None) -> None:
        job = Job(max_tokens=max_tokens, session=session)
        busy = self._busy(session)
        try:
            self.s.submit(job)
        except SessionBusy:
            assert busy
            return
        except QueueFull:
            assert not busy
            return
        assert not busy, "a busy session took a second job"
        self._enqueued(job)
        self.jobs.append(job)
        self.prompt[job] = prompt

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.jobs))
        before = job.state
        ended_now = self.s.cancel(job)
        assert ended_now == (before is JobState.QUEUED)
        if ended_now:
            assert job.outcome == "cancelled"
        elif before is not JobState.DONE:
            assert job in self.s.to_cancel()

    @rule()
    def submit_barrier(self) -> None:
        if self.stopped:
            return
        barrier = Barrier()
        self.s.submit_barrier(barrier)
        self._enqueued(barrier)
        self.pending.append(barrier)

    @precondition(lambda self: bool(self.pending) or self.running_barrier is not None)
    @rule(data=st.data())
    def withdraw_barrier(self, data: st.DataObject) -> None:
        running = [] if self.running_barrier is None else [self.running_barrier]
        barrier = data.draw(st.sampled_from(self.pending + running))
        # Only a barrier that has not started can be withdrawn.
        assert self.s.withdraw_barrier(barrier) == (barrier is not self.running_barrier)
        if barrier in self.pending:
            self.pending.remove(barrier)

    @rule(session=st.sampled_from(["a", "b"]))
    def unpin(self, session: str) -> None:
        if any(j.session == session for j in self.s.admitted.values()):
            return  # only an idle session's pin is released
        pinned = self.s.pins.get(session)
        assert self.s.unpin(session) == pinned
        if pinned is not None:
            assert pinned in self.s.free

    # ---- the model thread's side ----------------------------------------------------------

    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        self._admit(data)

    def _admit(self, data: st.DataObject) -> None:
        sched = self.s
        free_before, pins_before = set(sched.free), dict(sched.pins)
        had_admitted = bool(sched.admitted)

        def choose(job: Job, free: Sequence[int]) -> int:
            assert sorted(free) == sorted(sched.free)
            return data.draw(st.sampled_from(sorted(free)))

        taken = sched.admit(choose)
        still_queued = [self.order[item] for item in sched.queue]
        for item in taken:
            if isinstance(item, Barrier):
                assert taken == [item]
                assert not had_admitted and not sched.admitted
                assert sched.barrier is item
                self.pending.remove(item)
                self.running_barrier = item
                assert all(n > self.order[item] for n in still_queued)
                continue
            assert item.state is JobState.ADMITTING
            assert item.seq is not None and sched.admitted[item.seq] is item
            pinned_path = item.session is not None and pins_before.get(item.session) == item.seq
            if pinned_path:
                # Skipped the line onto its own sequence, but never past a barrier.
                assert not any(
                    isinstance(q, Barrier) and self.order[q] < self.order[item] for q in sched.queue
                )
            else:
                assert item.seq in free_before
                assert all(n > self.order[item] for n in still_queued), "left out of order"
        fifo = [self.order[i] for i in taken if isinstance(i, Job) and i.seq in free_before]
        assert fifo == sorted(fifo)

    @precondition(lambda self: self.running_barrier is not None)
    @rule()
    def barrier_done(self) -> None:
        self._barrier_done()

    def _barrier_done(self) -> None:
        self.s.barrier_done()
        self.running_barrier = None

    def _starting(self) -> list[Job]:
        return [
            j
            for j in self.s.admitted.values()
            if j.state is JobState.ADMITTING and not j.cancel_requested
        ]

    @precondition(lambda self: bool(self._starting()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self._start(data, data.draw(st.sampled_from(self._starting())))

    def _start(self, data: st.DataObject, job: Job) -> None:
        n_prompt = self.prompt[job]
        n_context = data.draw(st.integers(0, n_prompt - 1))
        pause_at = data.draw(st.none() | st.integers(0, n_prompt))
        self.s.start(
            job, n_context=n_context, cursor=list(range(n_context, n_prompt)), pause_at=pause_at
        )
        assert job.state is JobState.RUNNING
        assert job.pause_at is None or job.pause_at > n_context

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self._step(data)

    @rule(data=st.data(), rounds=st.integers(1, 16))
    def serve(self, data: st.DataObject, rounds: int) -> None:
        """The thread's loop, several times over: admit, start what was admitted, step."""
        for _ in range(rounds):
            self._admit(data)
            if self.running_barrier is not None:
                self._barrier_done()
            for job in self._starting():
                self._start(data, job)
            self._step(data)
            self._take_ended()

    def _step(self, data: st.DataObject) -> None:
        sched = self.s
        ops = sched.plan()
        self._check_plan(ops)
        results: list[StepResult] = []
        for op in ops:
            if data.draw(st.integers(0, 19)) == 0:
                results.append(SeqFailed(seq=op.seq, error=RuntimeError("op failed")))
            elif isinstance(op, Prefill):
                results.append(Prefilled(seq=op.seq, n_tokens=len(op.tokens)))
            else:
                token = data.draw(st.integers(0, 50))
                eog = data.draw(st.integers(0, 3)) == 0
                results.append(Sampled(seq=op.seq, token=token, eog=eog))
        before = {op.seq: counts(sched.admitted[op.seq]) for op in ops}
        # Results come back in any order.
        out = sched.apply(ops, data.draw(st.permutations(results)))
        assert len(out.fed) + len(out.sampled) + len(out.failed) == len(ops)
        for job, tokens in out.fed:
            n_context, n_generated = before[seq_of(job)]
            assert counts(job) == (n_context + len(tokens), n_generated)
        for s in out.sampled:
            n_context, n_generated = before[seq_of(s.job)]
            assert counts(s.job) == (n_context + 1, n_generated + 1)
        for job, error in out.failed:
            assert counts(job) == before[seq_of(job)]
            sched.fail(job, error)
            assert job.outcome is error
        for s in out.sampled:
            assert s.job.n_context <= N_CTX
            if s.job.cancel_requested:
                continue  # finished as cancelled below
            reason = sched.natural_finish(s, is_eog=s.eog)
            if reason is not None:
                self._finish(data, s.job, reason)
        for job in sched.prefill_complete():
            self._finish(data, job, "stop")
        for job in sched.to_cancel():
            sched.finish(job, "cancelled")
        for job in sched.admitted.values():
            if job.state is JobState.RUNNING and job.paused:
                job.pause_at = None  # the cold save is made

    def _finish(self, data: st.DataObject, job: Job, reason: FinishReason) -> None:
        pin = job.session is not None and data.draw(st.integers(0, 3)) > 0
        self.s.finish(job, reason, pin=pin)
        if pin:
            assert self.s.pins[job.session] == job.seq

    def _check_plan(self, ops: Sequence[Prefill | Decode]) -> None:
        sched = self.s
        seqs = [op.seq for op in ops]
        assert len(seqs) == len(set(seqs))
        budget = sched.n_batch
        for op in ops:
            job = sched.admitted[op.seq]
            assert job.state is JobState.RUNNING
            assert not job.cancel_requested and not job.paused
            if isinstance(op, Decode):
                assert not job.feeding and job.max_tokens != 0
                budget -= 1
                continue
            n = len(op.tokens)
            assert 1 <= n <= sched.prefill_chunk
            assert list(op.tokens) == job.cursor[:n]
            assert job.pause_at is None or job.n_context + n <= job.pause_at
            assert op.logits == (n == len(job.cursor) and job.max_tokens != 0)
            budget -= n
        assert budget >= 0
        for job in sched.admitted.values():
            if job.state is not JobState.RUNNING or job.cancel_requested or job.paused:
                continue
            if not job.feeding and job.max_tokens != 0:
                assert job.seq in seqs, "a decoder was starved"
            if job.feeding and job.seq not in seqs:
                assert budget == 0, "a feeder was left out of a batch with room"

    @rule(now=st.integers(0, 29))
    def fail_all(self, now: int) -> None:
        if now or self.stopped:
            return  # rarely, and once: it ends the run's interesting part
        error = RuntimeError("model gone")
        live = [j for j in self.jobs if j.state is not JobState.DONE]
        assert self.s.fail_all(error) == self.pending
        self.pending = []
        assert all(j.outcome is error for j in live)
        assert not self.s.admitted and not self.s.queue
        self.stopped = True

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def every_ended_job_is_reported_once(self) -> None:
        if self.sched is not None:
            self._take_ended()

    def _take_ended(self) -> None:
        """What the driver does after every call that may end a job."""
        assert self.sched is not None
        for job in self.sched.take_ended():
            self.reported[job] += 1
            assert self.reported[job] == 1, "a job was reported ended twice"
            assert job.state is JobState.DONE
            assert job.outcome is not None
        done = {j for j in self.jobs if j.state is JobState.DONE}
        assert done == set(self.reported)

    @invariant()
    def sequences_are_free_admitted_or_pinned(self) -> None:
        if self.sched is None:
            return
        sched = self.sched
        free, admitted, pinned = set(sched.free), set(sched.admitted), set(sched.pinned_seq)
        assert len(free) == len(sched.free), "a sequence is free twice"
        assert not free & admitted
        assert not free & pinned
        assert free | admitted | pinned == set(range(sched.n_seq))
        # A pinned sequence is admitted only to a job of its own session.
        for seq in admitted & pinned:
            assert sched.admitted[seq].session == sched.pinned_seq[seq]
        assert {v: k for k, v in sched.pins.items()} == sched.pinned_seq
        jobs = list(sched.admitted.values())
        assert len({id(j) for j in jobs}) == len(jobs), "a job holds two sequences"
        for seq, job in sched.admitted.items():
            assert job.seq == seq and job.state in LIVE
            assert job.n_context <= N_CTX

    @invariant()
    def the_queue_keeps_submission_order(self) -> None:
        if self.sched is None:
            return
        numbers = [self.order[item] for item in self.sched.queue]
        assert numbers == sorted(numbers)
        assert all(
            item.state is JobState.QUEUED for item in self.sched.queue if isinstance(item, Job)
        )

    @invariant()
    def a_barrier_runs_alone(self) -> None:
        if self.sched is None:
            return
        assert self.sched.barrier is self.running_barrier
        if self.sched.barrier is not None:
            assert not self.sched.admitted

    def teardown(self) -> None:
        sched = self.sched
        if sched is None:
            return
        for item in list(sched.queue):
            if isinstance(item, Job):
                assert sched.cancel(item)
            else:
                assert sched.withdraw_barrier(item)
        for job in list(sched.admitted.values()):
            sched.finish(job, "cancelled")
        self._take_ended()
        assert all(self.reported[job] == 1 for job in self.jobs)
        assert not sched.admitted
        assert set(sched.free) | set(sched.pinned_seq) == set(range(sched.n_seq))


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
TestScheduler = SchedulerMachine.TestCase
