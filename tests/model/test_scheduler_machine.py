"""The scheduler driven at random the way the model thread and the event loop drive it,
checking the invariants the scheduler's module docstring promises after every call.

The scheduler's fields are private, so the machine keeps its own model of what it handed
over (jobs and barriers in submission order, which session pins which sequence) and checks
the scheduler against it through the public reads only: ``statistics()``, ``job_on``,
``admitted_seqs``, ``pinned``, ``running`` and the jobs' own fields.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from erllama.backends.types import Decode, Prefill, Prefilled, SeqFailed, StepOp, StepResult
from erllama.backends.types import Sampled as SampledResult
from erllama.errors import QueueFull, SessionBusy
from erllama.model.scheduler import (
    Barrier,
    FinishReason,
    Job,
    JobState,
    Scheduler,
    SchedulerClosed,
)

from ..helpers import examples

N_CTX = 16
SESSIONS = ("a", "b")
#: A token that ends generation though the backend does not flag it (the model's eog set).
EOG = frozenset({7})
#: max_tokens (None: until eog or a full context; 0: prefill only), prompt length, session.
REQUESTS = st.tuples(
    st.none() | st.just(0) | st.integers(1, 8),
    st.integers(1, N_CTX - 1),
    st.sampled_from([None, None, *SESSIONS]),
)
LIVE = (JobState.ADMITTING, JobState.RUNNING)

AJob = Job[int]
ABarrier = Barrier[int]
Item = AJob | ABarrier


def counts(job: AJob) -> tuple[int, int]:
    return job.n_context, job.n_generated


def seq_of(job: AJob) -> int:
    assert job.seq is not None
    return job.seq


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler[int, int] | None = None
        #: Owners are submission numbers: the order every job and barrier entered the queue.
        self.numbers = itertools.count()
        self.jobs: list[AJob] = []
        self.prompt: dict[AJob, int] = {}
        #: Barriers queued, in order, and the one running.
        self.pending: list[ABarrier] = []
        self.running_barrier: ABarrier | None = None
        #: Session -> the sequence it pins, as the machine expects it.
        self.pins: dict[str, int] = {}
        #: How many times each job was reported ended, by the call that ended it.
        self.ended: Counter[AJob] = Counter()
        self.closed = False
        #: Closed with an error: nothing is left to close.
        self.failed = False
        self.n_seq = self.n_batch = self.chunk = self.max_queue = 0

    @property
    def s(self) -> Scheduler[int, int]:
        assert self.sched is not None
        return self.sched

    # ---- the machine's model ----------------------------------------------------------------

    def _queued(self) -> list[Item]:
        """Jobs and barriers waiting, in submission order."""
        items: list[Item] = [j for j in self.jobs if j.state is JobState.QUEUED]
        return sorted([*items, *self.pending], key=lambda i: i.owner)

    def _live(self) -> list[AJob]:
        return [j for j in self.jobs if j.state in LIVE]

    def _free(self) -> set[int]:
        held = {seq_of(j) for j in self._live()} | set(self.pins.values())
        return set(range(self.n_seq)) - held

    def _busy(self, session: str | None) -> bool:
        """The session has a job queued or admitted (the model's own view)."""
        return session is not None and any(
            j.session == session and j.state is not JobState.DONE for j in self.jobs
        )

    def _idle_pinned(self) -> list[str]:
        return sorted(s for s in self.pins if not self._busy(s))

    def _ends(self, job: AJob) -> None:
        """``job`` was just ended by a call that says so."""
        self.ended[job] += 1
        assert self.ended[job] == 1, "a job ended twice"
        assert job.state is JobState.DONE
        assert job.outcome is not None

    def _unpinned(self, job: AJob, seq: int | None) -> None:
        """``job`` ended without keeping its sequence: a pin it ran on is gone."""
        if job.session is not None and seq is not None and self.pins.get(job.session) == seq:
            del self.pins[job.session]

    # ---- the loop's side --------------------------------------------------------------------

    @initialize(
        n_seq=st.integers(1, 4),
        spare=st.integers(0, 8),
        chunk=st.integers(1, 12),
        max_queue=st.integers(0, 6),
    )
    def configure(self, n_seq: int, spare: int, chunk: int, max_queue: int) -> None:
        self.n_seq, self.n_batch = n_seq, n_seq + spare
        self.chunk, self.max_queue = chunk, max_queue
        self.sched = Scheduler(
            model_id="m",
            n_seq=n_seq,
            n_batch=n_seq + spare,
            prefill_chunk=chunk,
            n_ctx=N_CTX,
            max_queue=max_queue,
        )

    @rule(
        requests=st.lists(REQUESTS, min_size=1, max_size=4),
        sampler=st.sampled_from([None, "sampler"]),
    )
    def add_request(
        self, requests: list[tuple[int | None, int, str | None]], sampler: str | None
    ) -> None:
        for max_tokens, prompt, session in requests:
            self._add(max_tokens, prompt, session, sampler)

    @precondition(lambda self: bool(self._idle_pinned()))
    @rule(data=st.data(), request=REQUESTS)
    def resume_session(
        self, data: st.DataObject, request: tuple[int | None, int, str | None]
    ) -> None:
        """A pinned session's next request."""
        max_tokens, prompt, _ = request
        self._add(max_tokens, prompt, data.draw(st.sampled_from(self._idle_pinned())), None)

    def _add(
        self, max_tokens: int | None, prompt: int, session: str | None, sampler: object
    ) -> None:
        job = Job(next(self.numbers), max_tokens=max_tokens, session=session, sampler=sampler)
        waiting = sum(1 for j in self.jobs if j.state is JobState.QUEUED)
        expected: type[Exception] | None = None
        if self.closed:
            expected = SchedulerClosed
        elif self._busy(session):
            expected = SessionBusy
        elif session not in self.pins and waiting - len(self._free()) >= self.max_queue:
            expected = QueueFull
        if expected is not None:
            with pytest.raises(expected):
                self.s.add_request(job)
            assert job.state is JobState.QUEUED and job.seq is None
            return
        self.s.add_request(job)
        self.jobs.append(job)
        self.prompt[job] = prompt

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        # Half the time one that holds a sequence, if any: most jobs are queued or done.
        live = self._live()
        job = data.draw(st.sampled_from(live if live and data.draw(st.booleans()) else self.jobs))
        self._abort(job)

    def _abort(self, job: AJob) -> None:
        before, outcome = job.state, job.outcome
        ended_now = self.s.abort(job)
        assert ended_now == (before is JobState.QUEUED)
        if ended_now:
            assert job.outcome == "cancelled" and job.seq is None
            self._ends(job)
        elif before is JobState.DONE:
            assert job.outcome is outcome
        else:
            assert job.cancel_requested and job.state is before
            assert job in self.s.housekeeping().aborted

    @rule()
    def add_barrier(self) -> None:
        barrier = Barrier(next(self.numbers))
        if self.closed:
            with pytest.raises(SchedulerClosed):
                self.s.add_barrier(barrier)
            return
        self.s.add_barrier(barrier)
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

    @rule(session=st.sampled_from(SESSIONS))
    def unpin(self, session: str) -> None:
        self._unpin(session)

    def _unpin(self, session: str) -> None:
        seq = self.pins.get(session)
        in_use = seq is not None and seq in {seq_of(j) for j in self._live()}
        free_before = self.s.statistics().free
        if seq is None or in_use:
            # No pin, or its session's job runs on it: the pin stays.
            assert self.s.unpin(session) is None
            assert self.s.pinned(session) == seq
            return
        assert self.s.unpin(session) == seq
        del self.pins[session]
        assert self.s.pinned(session) is None
        assert self.s.statistics().free == free_before + 1

    @precondition(lambda self: not self.failed)
    @rule(now=st.integers(0, 29), with_error=st.booleans())
    def close(self, now: int, with_error: bool) -> None:
        """Rarely (it ends the run's interesting part): the model stops (no error: queued
        jobs are cancelled, admitted ones run on until the driver ends them, and it may
        still fail after) or is gone (every job fails)."""
        if now != 17:
            return
        self.failed = with_error
        error = RuntimeError("model gone") if with_error else None
        waiting = [j for j in self._queued() if isinstance(j, Job)]
        live = self._live()
        held = {j: j.seq for j in live}
        closed = self.s.close(error)
        self.closed = True
        assert list(closed.barriers) == self.pending
        self.pending = []
        if error is None:
            assert list(closed.jobs) == waiting
            assert all(j.outcome == "cancelled" for j in waiting)
            assert all(j.state in LIVE and j.outcome is None for j in live)
        else:
            n = len(live)
            assert set(closed.jobs[:n]) == set(live) and len(closed.jobs) == n + len(waiting)
            assert list(closed.jobs[n:]) == waiting
            assert all(j.outcome is error for j in closed.jobs)
            for job in live:
                self._unpinned(job, held[job])
            assert self.s.admitted_seqs() == frozenset()
        for job in closed.jobs:
            self._ends(job)
        assert self.s.statistics().waiting == 0

    # ---- the model thread's side ------------------------------------------------------------

    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        self._admit(data)

    def _expected_admit(self) -> list[Item]:
        """What admit() must take now: session jobs onto their pins (never past a barrier),
        then the queue's head in order while sequences are free, or a barrier once nothing
        is admitted; nothing while a barrier runs or after close."""
        if self.running_barrier is not None or self.closed:
            return []
        queue = self._queued()
        taken: list[Item] = []
        for item in queue:
            if isinstance(item, Barrier):
                break
            if item.session in self.pins:
                taken.append(item)
        admitted = bool(self._live() or taken)
        n_free = len(self._free())
        for item in (i for i in queue if i not in taken):
            if isinstance(item, Barrier):
                if not admitted:
                    taken.append(item)
                break
            if not n_free:
                break
            taken.append(item)
            n_free -= 1
            admitted = True
        return taken

    def _admit(self, data: st.DataObject) -> None:
        sched = self.s
        expected = self._expected_admit()
        free_now = self._free()
        free_before, pins_before = set(free_now), dict(self.pins)
        had_admitted = bool(self._live())
        queue_before = self._queued()

        def choose(job: AJob, free: Sequence[int]) -> int:
            # Runs under the scheduler's lock: no calls back in.
            assert len(set(free)) == len(free), "a sequence is free twice"
            assert set(free) == free_now
            seq = data.draw(st.sampled_from(sorted(free)))
            free_now.discard(seq)
            return seq

        taken = sched.admit(choose)
        assert taken == expected
        still_queued = [item.owner for item in self._queued() if item not in taken]
        for item in taken:
            if isinstance(item, Barrier):
                assert taken == [item]
                assert not had_admitted and not sched.admitted_seqs()
                assert item is self.pending[0]
                self.pending.remove(item)
                self.running_barrier = item
                assert all(n > item.owner for n in still_queued)
                continue
            assert item.state is JobState.ADMITTING
            assert sched.job_on(seq_of(item)) is item
            pinned_path = item.session is not None and pins_before.get(item.session) == item.seq
            if pinned_path:
                # Skipped the line onto its own sequence, but never past a barrier.
                assert not any(
                    isinstance(q, Barrier) and q.owner < item.owner for q in queue_before
                )
            else:
                assert item.seq in free_before
                assert all(n > item.owner for n in still_queued), "left out of order"
        fifo = [i.owner for i in taken if isinstance(i, Job) and i.seq in free_before]
        assert fifo == sorted(fifo)

    @precondition(lambda self: self.running_barrier is not None)
    @rule()
    def barrier_done(self) -> None:
        self._barrier_done()

    def _barrier_done(self) -> None:
        self.s.barrier_done()
        self.running_barrier = None

    def _starting(self) -> list[AJob]:
        return [j for j in self._live() if j.state is JobState.ADMITTING and not j.cancel_requested]

    @precondition(lambda self: bool(self._starting()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self._start(data, data.draw(st.sampled_from(self._starting())))

    def _start(self, data: st.DataObject, job: AJob) -> None:
        n_prompt = self.prompt[job]
        n_context = data.draw(st.integers(0, n_prompt - 1))
        pause_at = data.draw(st.none() | st.integers(0, n_prompt))
        self.s.start(
            job, n_context=n_context, cursor=list(range(n_context, n_prompt)), pause_at=pause_at
        )
        assert job.state is JobState.RUNNING
        assert job.pause_at is None or job.pause_at > n_context
        assert job in self.s.running()

    @precondition(lambda self: any(j.state is not JobState.ADMITTING for j in self.jobs))
    @rule(data=st.data(), how=st.sampled_from(["start", "finish", "finish-pin", "fail"]))
    def out_of_turn(self, data: st.DataObject, how: str) -> None:
        """Calls the contract refuses, changing nothing: start() of a job that is not
        ADMITTING, and ending a job a second time (a job ends exactly once)."""
        if how == "start":
            job = data.draw(
                st.sampled_from([j for j in self.jobs if j.state is not JobState.ADMITTING])
            )
            before = (job.state, job.n_context, list(job.cursor), job.pause_at)
            with pytest.raises(RuntimeError, match="start"):
                self.s.start(job, n_context=0, cursor=[1], pause_at=None)
            assert (job.state, job.n_context, job.cursor, job.pause_at) == before
            return
        done = [j for j in self.jobs if j.state is JobState.DONE]
        if not done:
            return
        job = data.draw(st.sampled_from(done))
        outcome, stats = job.outcome, self.s.statistics()
        with pytest.raises(RuntimeError, match="exactly once"):
            if how == "fail":
                self.s.fail(job, RuntimeError("late"))
            else:
                self.s.finish_request(job, "stop", pin=how == "finish-pin")
        assert job.outcome is outcome
        assert self.s.statistics() == stats

    def _emitted(self, data: st.DataObject, job: AJob) -> None:
        """What the driver does with a token that did not end its job: now and then feed
        tokens it did not sample (a thinking span's end marker), or switch greedy picking
        on or off (a tool call's syntax)."""
        if data.draw(st.integers(0, 3)) == 0:
            tokens = data.draw(st.lists(st.integers(100, 110), min_size=1, max_size=3))
            fits = job.n_context + len(job.cursor) + len(tokens) + 1 <= N_CTX
            cursor = list(job.cursor)
            assert self.s.insert(job, tokens) == fits
            assert job.cursor == (cursor + tokens if fits else cursor)
        if data.draw(st.integers(0, 3)) == 0:
            greedy = not job.greedy
            self.s.set_greedy(job, greedy)
            assert job.greedy is greedy

    @rule(data=st.data())
    def housekeeping(self, data: st.DataObject) -> None:
        self._housekeeping(data)

    def _housekeeping(self, data: st.DataObject) -> None:
        """Between steps: end the aborted and prefilled jobs, save and resume the paused."""
        todo = self.s.housekeeping()
        live = self._live()
        aborted = {j for j in live if j.cancel_requested}
        prefilled = {
            j
            for j in live
            if j.state is JobState.RUNNING
            and j not in aborted
            and j.max_tokens == 0
            and not j.cursor
        }
        paused = {
            j
            for j in live
            if j.state is JobState.RUNNING and j not in aborted | prefilled and j.paused
        }
        assert (set(todo.aborted), set(todo.prefilled), set(todo.paused)) == (
            aborted,
            prefilled,
            paused,
        )
        assert len(todo.aborted) + len(todo.prefilled) + len(todo.paused) == len(
            aborted | prefilled | paused
        )
        for job in todo.aborted:
            self._finish(data, job, "cancelled")
        for job in todo.prefilled:
            self._finish(data, job, "stop")
        for job in todo.paused:
            self.s.resume(job)  # the cold save is made
            assert not job.paused

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self._step(data)

    @rule(data=st.data(), rounds=st.integers(1, 16))
    def serve(self, data: st.DataObject, rounds: int) -> None:
        """The thread's loop, several times over: housekeeping, yield a session when starved,
        admit, run a barrier, start what was admitted, step."""
        for _ in range(rounds):
            self._housekeeping(data)
            if self.s.starved() and self._idle_pinned():
                self._unpin(self._idle_pinned()[0])
            self._admit(data)
            if self.running_barrier is not None:
                self._barrier_done()
            for job in self._starting():
                self._start(data, job)
            self._step(data)
            # The loop's aborts and session releases land between steps.
            live = self._live()
            if live and data.draw(st.integers(0, 7)) == 0:
                self._abort(data.draw(st.sampled_from(live)))
            if data.draw(st.integers(0, 7)) == 0:
                self._unpin(data.draw(st.sampled_from(SESSIONS)))

    def _step(self, data: st.DataObject) -> None:
        sched = self.s
        plan = sched.schedule()
        assert bool(plan) == bool(plan.ops)
        self._check_plan(plan.ops)
        results: list[StepResult] = []
        for op in plan.ops:
            if data.draw(st.integers(0, 19)) == 0:
                results.append(SeqFailed(seq=op.seq, error=RuntimeError("op failed")))
            elif isinstance(op, Prefill):
                results.append(Prefilled(seq=op.seq, n_tokens=len(op.tokens)))
            else:
                token = data.draw(st.integers(0, 9))
                eog = data.draw(st.integers(0, 7)) == 0
                results.append(SampledResult(seq=op.seq, token=token, eog=eog))
        jobs = {op.seq: sched.job_on(op.seq) for op in plan.ops}
        before = {seq: counts(job) for seq, job in jobs.items() if job is not None}
        flagged = {r.seq: r.eog for r in results if isinstance(r, SampledResult)}
        # Results come back in any order.
        out = sched.update_from_output(plan, data.draw(st.permutations(results)), eog=EOG)
        assert len(out.fed) + len(out.sampled) + len(out.failed) == len(plan.ops)
        for job, tokens in out.fed:
            n_context, n_generated = before[seq_of(job)]
            assert counts(job) == (n_context + len(tokens), n_generated)
        for s in out.sampled:
            job = s.job
            assert jobs[seq_of(job)] is job
            n_context, n_generated = before[seq_of(job)]
            assert counts(job) == (n_context + 1, n_generated + 1)
            assert job.n_context <= N_CTX
            # The natural end: end of generation, then max_tokens, then a full context.
            assert s.eog == (flagged[seq_of(job)] or s.token in EOG)
            if s.eog:
                assert s.finish == "stop"
            elif (job.max_tokens is not None and job.n_generated >= job.max_tokens) or (
                job.n_context >= N_CTX
            ):
                assert s.finish == "length"
            else:
                assert s.finish is None
        for job, error in out.failed:
            assert counts(job) == before[seq_of(job)]
            seq = job.seq
            sched.fail(job, error)
            assert job.outcome is error
            self._ends(job)
            self._unpinned(job, seq)
        for s in out.sampled:
            if s.job.cancel_requested:
                continue  # finished as cancelled between steps
            # A stop string (the driver's) ends it before any natural end.
            stop_string = data.draw(st.integers(0, 9)) == 0
            reason: FinishReason | None = "stop" if stop_string else s.finish
            if reason is not None:
                self._finish(data, s.job, reason)
            else:
                self._emitted(data, s.job)

    def _finish(self, data: st.DataObject, job: AJob, reason: FinishReason) -> None:
        # Like the driver: only a started job keeps its sequence for its session.
        seq = job.seq
        pin = (
            job.state is JobState.RUNNING
            and job.session is not None
            and data.draw(st.integers(0, 3)) > 0
        )
        self.s.finish_request(job, reason, pin=pin)
        assert job.outcome == reason
        self._ends(job)
        if pin:
            assert job.session is not None and seq is not None
            self.pins[job.session] = seq
            assert self.s.pinned(job.session) == seq
        else:
            self._unpinned(job, seq)
        assert seq not in self.s.admitted_seqs()

    def _check_plan(self, ops: Sequence[StepOp]) -> None:
        sched = self.s
        seqs = [op.seq for op in ops]
        assert len(seqs) == len(set(seqs))
        budget = self.n_batch
        feeding = False
        slices = 0
        last = 0
        for op in ops:
            job = sched.job_on(op.seq)
            assert job is not None
            assert job.state is JobState.RUNNING
            assert not job.cancel_requested and not job.paused
            if isinstance(op, Decode):
                assert not feeding, "a decode after a slice"
                assert not job.feeding and job.max_tokens != 0
                assert op.sampler is job.sampler and op.greedy is job.greedy
                budget -= 1
                continue
            feeding = True
            # Shortest remaining first.
            assert len(job.cursor) >= last
            last = len(job.cursor)
            n = len(op.tokens)
            # A whole grid cell of absolute positions (or the rest of the cursor, or up to
            # the pause point): never cut short for the batch.
            assert n == self._chunk_of(job)
            assert 1 <= n <= self.chunk
            assert list(op.tokens) == job.cursor[:n]
            assert job.pause_at is None or job.n_context + n <= job.pause_at
            assert op.logits == (n == len(job.cursor) and job.max_tokens != 0)
            # The step's first slice goes whatever the batch has left (nothing starves);
            # the others fit in it.
            assert slices == 0 or n <= budget
            budget -= n
            slices += 1
        for job in self._live():
            if job.state is not JobState.RUNNING or job.cancel_requested or job.paused:
                assert job.seq not in seqs
                continue
            if not job.feeding and job.max_tokens != 0:
                assert job.seq in seqs, "a decoder was starved"
            if job.feeding and job.seq not in seqs:
                assert slices > 0 and self._chunk_of(job) > budget, (
                    "a feeder was left out of a batch with room for its cell"
                )

    def _chunk_of(self, job: AJob) -> int:
        """What the grid gives ``job`` next: up to the next multiple of the chunk size."""
        to_grid = (job.n_context // self.chunk + 1) * self.chunk - job.n_context
        n = min(len(job.cursor), to_grid)
        if job.pause_at is not None:
            n = min(n, job.pause_at - job.n_context)
        return n

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def every_job_ends_exactly_once(self) -> None:
        for job in self.jobs:
            done = job.state is JobState.DONE
            assert self.ended[job] == (1 if done else 0), "an ended job went unreported"
            assert (job.outcome is not None) == done

    @invariant()
    def sequences_are_free_admitted_or_pinned(self) -> None:
        if self.sched is None:
            return
        sched = self.sched
        live = self._live()
        admitted = sched.admitted_seqs()
        assert admitted == {seq_of(j) for j in live}
        assert len(admitted) == len(live), "a sequence holds two jobs"
        for job in live:
            assert sched.job_on(seq_of(job)) is job
            assert 0 <= seq_of(job) < self.n_seq
            assert job.n_context <= N_CTX
        assert set(sched.running()) == {j for j in live if j.state is JobState.RUNNING}
        assert {s: sched.pinned(s) for s in SESSIONS} == {s: self.pins.get(s) for s in SESSIONS}
        pinned = set(self.pins.values())
        assert len(pinned) == len(self.pins), "two sessions pin one sequence"
        # A pinned sequence is admitted only to a job of its own session.
        for session, seq in self.pins.items():
            job = sched.job_on(seq)
            assert job is None or job.session == session
        stats = sched.statistics()
        assert stats.n_seq == self.n_seq
        assert stats.pinned == len(self.pins)
        assert stats.free == len(self._free())
        assert stats.free + len(admitted | pinned) == self.n_seq
        assert stats.running == len(live)

    @invariant()
    def the_queue_is_as_submitted(self) -> None:
        if self.sched is None:
            return
        queued = [j for j in self.jobs if j.state is JobState.QUEUED]
        assert all(j.seq is None and not j.cancel_requested for j in queued)
        stats = self.s.statistics()
        assert stats.waiting == len(queued)
        assert stats.busy == bool(queued or self._live() or self.pending or self.running_barrier)
        if self._live():
            phase = (
                "prefilling"
                if any(j.state is JobState.ADMITTING or j.feeding for j in self._live())
                else "generating"
            )
        else:
            phase = "idle"
        assert stats.phase == phase
        if self.closed:
            assert not queued and not self.pending

    @invariant()
    def a_barrier_runs_alone(self) -> None:
        if self.sched is None:
            return
        stats = self.s.statistics()
        assert stats.barriers == len(self.pending) + (self.running_barrier is not None)
        if self.running_barrier is not None:
            assert not self.s.admitted_seqs()

    @invariant()
    def starved_only_when_an_unpin_could_help(self) -> None:
        if self.sched is None:
            return
        free = self._free()
        needy = any(isinstance(i, Job) and i.session not in self.pins for i in self._queued())
        starved = self.s.starved()
        if starved:
            assert not free and self.pins and needy and self.running_barrier is None
        live_seqs = {seq_of(j) for j in self._live()}
        idle_pin = any(seq not in live_seqs for seq in self.pins.values())
        if not free and idle_pin and needy and self.running_barrier is None:
            assert starved

    def teardown(self) -> None:
        if self.sched is None:
            return
        sched = self.sched
        for item in self._queued():
            if isinstance(item, Job):
                assert sched.abort(item)
                self._ends(item)
            else:
                assert sched.withdraw_barrier(item)
        for job in self._live():
            sched.finish_request(job, "cancelled")
            self._ends(job)
        if self.running_barrier is not None:
            sched.barrier_done()
        assert all(self.ended[job] == 1 for job in self.jobs)
        stats = sched.statistics()
        assert (stats.running, stats.waiting, stats.barriers, stats.busy) == (0, 0, 0, False)
        assert stats.free + stats.pinned == self.n_seq
        closed = sched.close()
        assert not closed.jobs and not closed.barriers


SchedulerMachine.TestCase.settings = settings(max_examples=examples(2), stateful_step_count=50)
TestScheduler = SchedulerMachine.TestCase
