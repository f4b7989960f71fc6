"""Batch scheduling as a synchronous state machine: no awaits, no threads, no backend.

A :class:`Job` is the scheduling half of one request. Jobs move

    QUEUED --admit--> ADMITTING --start--> RUNNING --finish/fail--> DONE
       \\______________________abort (queued: at once)________________/^

and every job reaches DONE exactly once. Whoever ends a job (the call that returns it ended)
delivers its terminal event and frees its sampler.

The contract is closed, in the manner of vLLM v1's scheduler: callers add work
(:meth:`~Scheduler.add_request`, :meth:`~Scheduler.add_barrier`), ask for the next step
(:meth:`~Scheduler.schedule`), report what the step did (:meth:`~Scheduler.update_from_output`,
which decides the natural ends: end of generation, ``max_tokens``, a full context), end jobs
(:meth:`~Scheduler.finish_request`, :meth:`~Scheduler.abort`, :meth:`~Scheduler.fail`) and read
:meth:`~Scheduler.statistics`. Its fields are private; a :class:`Job`'s scheduling fields are
written only here (callers read them).

**Locking.** Every public method holds the scheduler's own lock for its whole run, so the
event loop (intake, abort, statistics) and the model thread (everything else) may call any of
them at any time. A ``choose`` callback passed to :meth:`~Scheduler.admit` runs under the lock
and must not call back in. The scheduler's own fields are touched only inside its methods; a
job's scheduling fields are written only there too, and its driver (the model thread) reads
them between calls (a stale ``cancel_requested`` delays an abort by at most one step).

Invariants (checked by a hypothesis state machine in tests/model/test_scheduler_machine.py):

* a sequence belongs to at most one admitted job or session pin, and every sequence is
  free, admitted or pinned;
* jobs leave the queue in submission order (a session job whose sequence is pinned to it
  does not compete for a free one, so it does not wait behind others);
* a barrier (an exclusive control such as an adapter change) is taken only when no job is
  admitted, and nothing queued behind it is admitted before it is done;
* once :meth:`~Scheduler.close` has run, nothing new is queued.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import attrs

from ..backends.types import Decode, Prefill, Prefilled, SeqFailed, StepOp, StepResult
from ..errors import QueueFull, SessionBusy

__all__ = [
    "Barrier",
    "Closed",
    "DraftSource",
    "Housekeeping",
    "Job",
    "JobState",
    "Sampled",
    "Scheduler",
    "SchedulerClosed",
    "SchedulerStats",
    "StepOutputs",
    "StepPlan",
]

FinishReason = Literal["stop", "length", "cancelled"]
Phase = Literal["idle", "prefilling", "generating"]

#: What a job schedules (a request), and what a barrier runs (a call); opaque here.
R = TypeVar("R")
B = TypeVar("B")


class DraftSource(Protocol):
    """A job's speculative decoding (``erllama.speculative.DraftControl``)."""

    def size(self) -> int:
        """Tokens to draft this step (0: none); called once per step."""
        ...

    def propose(self, n: int, greedy: bool) -> Callable[[int], Sequence[int]]:
        """The ``Decode.draft`` of a draft of at most ``n`` tokens, verified with the
        request's greedy chain (``greedy``) or its draw."""
        ...

    def update(self, drafted: int, accepted: int) -> None:
        """What the step did with the draft."""
        ...


class JobState(enum.Enum):
    QUEUED = "queued"  # waiting in the FIFO queue
    ADMITTING = "admitting"  # holds a sequence; its prefix is being restored or cleared
    RUNNING = "running"  # in the batch: feeding tokens (prefill) or decoding
    DONE = "done"  # ended; ``outcome`` says how


class SchedulerClosed(RuntimeError):
    """Work was added after :meth:`Scheduler.close` (the model is going away)."""


@attrs.define(eq=False)
class Job(Generic[R]):
    """One request as the scheduler sees it. ``owner``, ``max_tokens``, ``session`` and
    ``sampler`` are fixed when it is made; every other field is written by the scheduler
    only."""

    owner: R
    #: Tokens to generate: None = until end of generation or a full context; 0 = none
    #: (prefill only: the job ends when its prompt is in the KV).
    max_tokens: int | None
    #: Pins the sequence across requests (see :meth:`Scheduler.finish_request`).
    session: str | None = None
    #: The backend sampler its decodes use (opaque; None = greedy).
    sampler: object = None
    #: Its decodes ask for log-probabilities with this many alternatives (None: none).
    logprobs: int | None = None
    #: Speculative decoding: its decodes carry drafts (None: plain decoding).
    draft: DraftSource | None = None
    state: JobState = JobState.QUEUED
    seq: int | None = None
    #: Tokens still to feed into the KV: the prompt's rest, or tokens the engine inserts
    #: (a thinking span's end marker). Empty while decoding.
    cursor: list[int] = attrs.Factory(list)
    #: Context length at which feeding pauses for a save (the cold save point), or None.
    pause_at: int | None = None
    #: A running job whose prompt shares this one's first ``share_at`` tokens: this job
    #: feeds nothing until the leader's KV holds them, then takes them from it (in-flight
    #: prefix sharing; see :meth:`Scheduler.start`). None: it feeds on its own.
    leader: Job[R] | None = None
    share_at: int = 0
    #: Tokens now in the sequence's KV (restored + fed + generated).
    n_context: int = 0
    n_generated: int = 0
    #: Pick the next token greedily (inside a tool call's syntax).
    greedy: bool = False
    cancel_requested: bool = False
    #: How it ended: a finish reason, or the exception that failed it.
    outcome: FinishReason | BaseException | None = None

    @property
    def feeding(self) -> bool:
        return bool(self.cursor)

    @property
    def paused(self) -> bool:
        return self.pause_at is not None and self.n_context >= self.pause_at

    @property
    def waiting(self) -> bool:
        """It waits for its leader's prefill (see :meth:`Scheduler.start`)."""
        return self.leader is not None


@attrs.define(eq=False)
class Barrier(Generic[B]):
    """An exclusive control in the queue: it runs when no job is admitted, before anything
    queued after it."""

    owner: B


@attrs.frozen
class StepPlan:
    """One step: the ops for the backend, in the order they go into the batch."""

    ops: tuple[StepOp, ...]

    def __bool__(self) -> bool:
        return bool(self.ops)


@attrs.frozen
class Sampled(Generic[R]):
    """A token sampled for ``job`` in the last step (already in its KV). ``finish`` is the
    natural end it brings, if any: end of generation, ``max_tokens`` or a full context."""

    job: Job[R]
    token: int
    eog: bool
    finish: FinishReason | None
    #: The backend's log-probabilities for it, when the job asked.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@attrs.frozen
class StepOutputs(Generic[R]):
    """One step's results, by job: tokens fed, tokens sampled, and jobs whose own op
    failed (the driver ends them with :meth:`Scheduler.fail`; their KV is as before)."""

    fed: tuple[tuple[Job[R], Sequence[int]], ...] = ()
    sampled: tuple[Sampled[R], ...] = ()
    failed: tuple[tuple[Job[R], BaseException], ...] = ()


@attrs.frozen
class Housekeeping(Generic[R]):
    """What the driver must do between steps, before admitting, in this order: give the
    followers whose leader's KV now holds their shared prefix that prefix
    (:meth:`Scheduler.shared`; first, while every leader still holds its KV), let the
    followers whose leader ended too soon feed on their own (:meth:`Scheduler.go_alone`),
    end the aborted jobs, end the prefill-only jobs whose prompt is in, and save the jobs
    paused at their cold save point (then :meth:`Scheduler.resume` them)."""

    aborted: tuple[Job[R], ...] = ()
    prefilled: tuple[Job[R], ...] = ()
    paused: tuple[Job[R], ...] = ()
    #: Followers whose leader holds their ``share_at`` tokens (with the leader: a follower
    #: reads ``job.leader`` before :meth:`Scheduler.shared` clears it).
    shares: tuple[Job[R], ...] = ()
    #: Followers whose leader ended (or was cancelled) before it got there.
    orphans: tuple[Job[R], ...] = ()


@attrs.frozen
class Closed(Generic[R, B]):
    """What :meth:`Scheduler.close` ended: jobs (cancelled or failed; the driver delivers
    their terminal events) and barriers nobody will run (the driver answers their owners)."""

    jobs: tuple[Job[R], ...] = ()
    barriers: tuple[Barrier[B], ...] = ()


@attrs.frozen
class SchedulerStats:
    """A snapshot for status reads."""

    phase: Phase
    #: Requests queued (not yet holding a sequence).
    waiting: int
    #: Requests holding a sequence (admitting or running).
    running: int
    #: Anything admitted, queued, or a barrier running.
    busy: bool
    n_seq: int
    free: int
    pinned: int
    #: Barriers queued or running.
    barriers: int = 0


class Scheduler(Generic[R, B]):
    """Queue, sequences and the batch of one model. See the module docstring."""

    def __init__(
        self,
        *,
        model_id: str,
        n_seq: int,
        n_batch: int,
        prefill_chunk: int,
        n_ctx: int,
        max_queue: int,
        pad_zone: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        if n_batch < n_seq:
            raise ValueError(f"n_batch ({n_batch}) must be at least n_seq ({n_seq})")
        self._model_id = model_id
        self._n_seq = n_seq
        self._n_batch = n_batch
        self._prefill_chunk = prefill_chunk
        #: Set when the backend pads short chunks (``LoadedModel.fillers_fit_until``): chunks
        #: are then cut from where each prompt's feeding starts, and never across this
        #: cell, from where fillers have no room (the cells past it are fed the same way by
        #: every run).
        self._pad_zone = pad_zone
        #: Set when the backend computes a cell alike in any chunk
        #: (``LoadedModel.batch_invariant``): chunks are cut from where each prompt's
        #: feeding starts, as with padding, and nowhere else.
        self._anywhere = batch_invariant
        self._n_ctx = n_ctx
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._queue: deque[Job[R] | Barrier[B]] = deque()
        #: Free sequences, most recently freed last.
        self._free: list[int] = list(range(n_seq))[::-1]
        self._admitted: dict[int, Job[R]] = {}
        #: Session id -> its pinned sequence, and the reverse.
        self._pins: dict[str, int] = {}
        self._pinned_seq: dict[int, str] = {}
        self._barrier: Barrier[B] | None = None
        self._closed = False

    @property
    def n_seq(self) -> int:
        return self._n_seq

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    # ---- intake (the event loop) ------------------------------------------------------------

    def add_request(self, job: Job[R]) -> None:
        """Queue ``job``. SchedulerClosed after :meth:`close`; QueueFull when ``max_queue``
        requests would wait; SessionBusy when its session already has a job queued or
        admitted."""
        with self._lock:
            if self._closed:
                raise SchedulerClosed(self._model_id)
            if job.state is not JobState.QUEUED or job.seq is not None or job in self._queue:
                raise RuntimeError("add_request() of a job that was already added")
            if job.session is not None and self._session_busy(job.session):
                raise SessionBusy(self._model_id, job.session)
            if job.session not in self._pins:  # a pinned session's job needs no free sequence
                self._check_room()
            self._queue.append(job)

    def check_room(self) -> None:
        """QueueFull when one more request would make ``max_queue`` wait."""
        with self._lock:
            self._check_room()

    def add_barrier(self, barrier: Barrier[B]) -> None:
        with self._lock:
            if self._closed:
                raise SchedulerClosed(self._model_id)
            self._queue.append(barrier)

    def withdraw_barrier(self, barrier: Barrier[B]) -> bool:
        """Take a barrier out of the queue before it runs; False if it already started."""
        with self._lock:
            try:
                self._queue.remove(barrier)
            except ValueError:
                return False
            return True

    def abort(self, job: Job[R]) -> bool:
        """Cancel ``job``. A queued job ends at once (True); an admitted one is marked and
        ends between steps (see :meth:`housekeeping`). Idempotent."""
        with self._lock:
            if job.state is JobState.DONE:
                return False
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
                self._end(job, "cancelled")
                return True
            job.cancel_requested = True
            return False

    def statistics(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(
                phase=self._phase(),
                waiting=self._waiting(),
                running=len(self._admitted),
                busy=bool(self._admitted or self._queue or self._barrier is not None),
                n_seq=self._n_seq,
                free=len(self._free),
                pinned=len(self._pins),
                barriers=sum(1 for b in self._queue if isinstance(b, Barrier))
                + (self._barrier is not None),
            )

    # ---- between steps (the model thread) ------------------------------------------------------

    def housekeeping(self) -> Housekeeping[R]:
        with self._lock:
            aborted, prefilled, paused, shares, orphans = [], [], [], [], []
            for job in self._admitted.values():
                leader = job.leader
                if leader is not None and not job.cancel_requested:
                    if leader.n_context >= job.share_at and leader.state is JobState.RUNNING:
                        shares.append(job)  # (a cancelled leader's KV still serves)
                    elif leader.state is not JobState.RUNNING or leader.cancel_requested:
                        orphans.append(job)
                if job.cancel_requested:
                    aborted.append(job)
                elif job.state is JobState.RUNNING and leader is None:
                    if job.max_tokens == 0 and not job.cursor:
                        prefilled.append(job)
                    elif job.paused:
                        paused.append(job)
            return Housekeeping(
                tuple(aborted), tuple(prefilled), tuple(paused), tuple(shares), tuple(orphans)
            )

    def resume(self, job: Job[R]) -> None:
        """A paused job's cold save is done: feeding goes on."""
        with self._lock:
            job.pause_at = None

    def admit(self, choose: Callable[[Job[R], Sequence[int]], int]) -> list[Job[R] | Barrier[B]]:
        """Take what may start now, in FIFO order: jobs while sequences are free
        (``choose(job, free)`` picks one of ``free``), and a barrier once nothing is
        admitted. Returned jobs are ADMITTING; a returned barrier must be ended with
        :meth:`barrier_done` before anything else is admitted. Nothing after
        :meth:`close`."""
        with self._lock:
            taken: list[Job[R] | Barrier[B]] = []
            if self._barrier is not None or self._closed:
                return taken
            # Session jobs whose sequence is pinned for them skip the line: they take no free
            # sequence from anyone queued before them.
            for item in [i for i in self._queue if isinstance(i, Job) and i.session in self._pins]:
                if self._barrier_before(item):
                    break
                self._queue.remove(item)
                assert item.session is not None
                self._take(item, self._pins[item.session])
                taken.append(item)
            while self._queue:
                head = self._queue[0]
                if isinstance(head, Barrier):
                    if self._admitted:
                        break
                    self._queue.popleft()
                    self._barrier = head
                    taken.append(head)
                    break
                if not self._free:
                    break
                self._queue.popleft()
                seq = choose(head, tuple(self._free))
                self._free.remove(seq)
                self._take(head, seq)
                taken.append(head)
            return taken

    def barrier_done(self) -> None:
        with self._lock:
            self._barrier = None

    def start(
        self,
        job: Job[R],
        *,
        n_context: int,
        cursor: Sequence[int],
        pause_at: int | None,
        leader: Job[R] | None = None,
        share_at: int = 0,
    ) -> None:
        """ADMITTING -> RUNNING: the sequence holds ``n_context`` tokens of the prompt and
        ``cursor`` is what remains to feed (never empty: a fully known prompt re-feeds its
        last token for fresh logits).

        With a ``leader`` (a running job that is not itself waiting, whose prompt shares
        this one's first ``share_at`` tokens, ``share_at > n_context``), the job feeds
        nothing until the leader's KV holds those tokens: then :meth:`housekeeping` lists it
        in ``shares`` and the driver copies them over (:meth:`shared`); should the leader
        end first, in ``orphans`` (:meth:`go_alone`). A prefix is prefilled once however
        many requests that share it arrive together."""
        with self._lock:
            if job.state is not JobState.ADMITTING:
                raise RuntimeError(f"start() of a job that is {job.state.value}")
            if leader is not None and (
                leader.state is not JobState.RUNNING
                or leader.leader is not None
                or leader is job
                or share_at <= n_context
            ):
                raise RuntimeError("start() with a leader that cannot lead this job")
            job.state = JobState.RUNNING
            job.n_context = n_context
            job.cursor = list(cursor)
            job.pause_at = pause_at if pause_at is not None and pause_at > n_context else None
            job.leader = leader
            job.share_at = share_at if leader is not None else 0

    def shared(self, job: Job[R], *, n_context: int, cursor: Sequence[int]) -> None:
        """A follower took its shared prefix from its leader: its sequence holds
        ``n_context`` tokens and ``cursor`` remains; it feeds on its own from now on."""
        with self._lock:
            if job.leader is None or job.state is not JobState.RUNNING:
                raise RuntimeError("shared() of a job that waits for no leader")
            job.leader = None
            job.share_at = 0
            job.n_context = n_context
            job.cursor = list(cursor)
            if job.pause_at is not None and job.pause_at <= n_context:
                job.pause_at = None

    def go_alone(self, job: Job[R]) -> None:
        """A follower stops waiting (its leader ended too soon, or the copy failed) and
        feeds its prompt from what its own sequence holds."""
        with self._lock:
            job.leader = None
            job.share_at = 0

    def leaders(self) -> list[Job[R]]:
        """Running jobs that may lead a newly started one (not cancelled, not waiting)."""
        with self._lock:
            return [
                j
                for j in self._admitted.values()
                if j.state is JobState.RUNNING and j.leader is None and not j.cancel_requested
            ]

    def starved(self) -> bool:
        """A queued job needs a sequence, none is free, and idle sessions pin some: the
        driver should release the least recently used session."""
        with self._lock:
            if self._free or self._barrier is not None:
                return False
            if all(seq in self._admitted for seq in self._pins.values()):
                return False  # no idle pin to take back
            return any(isinstance(j, Job) and j.session not in self._pins for j in self._queue)

    # ---- one step (the model thread) ----------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next step's ops: every decoding job gets one token; feeding jobs get prefill
        chunks, shortest remaining first, while the step has room in ``n_batch``.

        **Chunks lie on a fixed grid.** A chunk is ``[jG, (j+1)G)`` of absolute positions
        (G = ``prefill_chunk``), clipped to what remains to feed and to the job's pause
        point, whatever position the prompt's feeding started from: a prompt fed after a
        restore at a grid point makes exactly the chunks its cold run made from there, so
        llama.cpp computes exactly the same cells (its kernels depend on a micro-batch's
        size, so another split would change the last bits of the KV and then, at
        temperature 0, the answer). A chunk is never shortened to fit the step: one that
        does not fit waits for the next step, except the step's first, so nothing starves.

        **Padded chunks** (a backend with ``LoadedModel.pad_rows``) and **batch-invariant**
        backends: every chunk is computed exactly wherever it starts, so chunks of G are cut
        from the prompt's feeding point instead, and a prompt fed after a restore needs no
        short chunk to reach the grid.
        """
        with self._lock:
            budget = self._n_batch
            grid = self._prefill_chunk
            ops: list[StepOp] = []
            feeders: list[Job[R]] = []
            decoders: list[Job[R]] = []
            for job in self._admitted.values():
                if (
                    job.state is not JobState.RUNNING
                    or job.cancel_requested
                    or job.paused
                    or job.waiting
                ):
                    continue
                if job.cursor:
                    feeders.append(job)
                elif job.max_tokens != 0:
                    decoders.append(job)
            budget -= len(decoders)
            for job in decoders:
                # A draft takes room in the batch before prefill chunks do, and never goes
                # past the job's max_tokens or its context (its sampled token comes first).
                n = self._draft_size(job, budget)
                budget -= n
                assert job.seq is not None
                ops.append(
                    Decode(
                        seq=job.seq,
                        sampler=job.sampler,
                        greedy=job.greedy,
                        logprobs=job.logprobs,
                        draft=(
                            job.draft.propose(n, job.greedy)
                            if n > 0 and job.draft is not None
                            else None
                        ),
                    )
                )
            # Shortest remaining first: a short prompt that arrives while a long one prefills
            # is fed at once (and samples next step) instead of waiting for the long prompt's
            # chunks to end.
            feeders.sort(key=lambda j: len(j.cursor))
            fed = False
            zone = self._pad_zone
            for job in feeders:
                if zone is None and not self._anywhere:
                    to_grid = (job.n_context // grid + 1) * grid - job.n_context
                elif zone is not None and job.n_context < zone:
                    to_grid = min(grid, zone - job.n_context)
                else:
                    to_grid = grid
                n = min(len(job.cursor), to_grid)
                if job.pause_at is not None:
                    n = min(n, job.pause_at - job.n_context)
                if fed and n > budget:
                    continue  # whole chunks only: this one waits for a step with room
                # Logits only where the next decode samples from: the last token fed.
                logits = n == len(job.cursor) and job.max_tokens != 0
                assert job.seq is not None
                ops.append(Prefill(seq=job.seq, tokens=tuple(job.cursor[:n]), logits=logits))
                budget -= n
                fed = True
            return StepPlan(tuple(ops))

    def _draft_size(self, job: Job[R], budget: int) -> int:
        if job.draft is None:
            return 0
        n = job.draft.size()
        if n <= 0:
            return 0
        if job.max_tokens is not None:
            n = min(n, job.max_tokens - job.n_generated - 1)
        return max(0, min(n, self._n_ctx - job.n_context - 1, budget))

    def job_on(self, seq: int) -> Job[R] | None:
        """The job admitted on ``seq`` (mid-step: whose token was just sampled)."""
        with self._lock:
            return self._admitted.get(seq)

    def update_from_output(
        self, plan: StepPlan, results: Sequence[StepResult], eog: frozenset[int] = frozenset()
    ) -> StepOutputs[R]:
        """Account one step's results and decide natural ends (a token in ``eog`` or
        flagged end of generation, ``max_tokens``, a full context). Raises ValueError for a
        result that does not answer an op of the plan, or an op left unanswered."""
        with self._lock:
            # Check every result against the plan first: the update is all or nothing.
            sent = {op.seq: op for op in plan.ops}
            checked: list[tuple[StepResult, StepOp, Job[R]]] = []
            for res in results:
                op = sent.pop(res.seq, None)
                job = self._admitted.get(res.seq)
                if op is None or job is None:
                    raise ValueError(f"step result for sequence {res.seq}, which had no op")
                if isinstance(res, Prefilled) and (
                    not isinstance(op, Prefill) or res.n_tokens != len(op.tokens)
                ):
                    raise ValueError(f"prefill result does not match its op on seq {res.seq}")
                if not isinstance(res, SeqFailed | Prefilled) and not isinstance(op, Decode):
                    raise ValueError(f"sampled result for a prefill op on seq {res.seq}")
                checked.append((res, op, job))
            if sent:
                raise ValueError(f"no step result for sequences {sorted(sent)}")
            fed: list[tuple[Job[R], Sequence[int]]] = []
            sampled: list[Sampled[R]] = []
            failed: list[tuple[Job[R], BaseException]] = []
            for res, op, job in checked:
                if isinstance(res, SeqFailed):
                    failed.append((job, res.error))
                elif isinstance(res, Prefilled):
                    assert isinstance(op, Prefill)
                    del job.cursor[: res.n_tokens]
                    job.n_context += res.n_tokens
                    fed.append((job, op.tokens))
                else:
                    job.n_context += 1
                    job.n_generated += 1
                    is_eog = res.eog or res.token in eog
                    end = self._natural_end(job, is_eog)
                    sampled.append(
                        Sampled(job, res.token, is_eog, end, res.logprob, res.top_logprobs)
                    )
                    if res.drafted and job.draft is not None:
                        job.draft.update(res.drafted, len(res.accepted))
                    # Accepted draft tokens, each as if sampled in a step of its own (the
                    # backend stops at an end of generation; the draft's size kept them
                    # inside max_tokens and the context).
                    for token in res.accepted:
                        if end is not None:
                            break
                        job.n_context += 1
                        job.n_generated += 1
                        is_eog = token in eog
                        end = self._natural_end(job, is_eog)
                        sampled.append(Sampled(job, token, is_eog, end))
            return StepOutputs(tuple(fed), tuple(sampled), tuple(failed))

    def insert(self, job: Job[R], tokens: Sequence[int]) -> bool:
        """Feed ``tokens`` into ``job``'s sequence before it decodes again (they are not
        sampled: a thinking span's end marker, say). False, and nothing fed, when they and
        one more token would not fit the context."""
        with self._lock:
            if job.n_context + len(job.cursor) + len(tokens) + 1 > self._n_ctx:
                return False
            job.cursor.extend(tokens)
            return True

    def set_greedy(self, job: Job[R], greedy: bool) -> None:
        with self._lock:
            job.greedy = greedy

    # ---- ending jobs (the model thread) ---------------------------------------------------------

    def finish_request(self, job: Job[R], reason: FinishReason, *, pin: bool = False) -> None:
        """End an admitted job. Its sequence is freed, or pinned to ``job.session`` when
        ``pin`` (the KV stays for the session's next request)."""
        with self._lock:
            if job.state is JobState.DONE:
                raise RuntimeError("a job ends exactly once")
            if job.state is JobState.QUEUED:
                raise RuntimeError("finish_request() of a queued job (abort it instead)")
            self._release(job, pin=pin)
            self._end(job, reason)

    def fail(self, job: Job[R], error: BaseException) -> None:
        """End one job with ``error`` (queued or admitted); the model carries on."""
        with self._lock:
            self._fail(job, error)

    def close(self, error: BaseException | None = None) -> Closed[R, B]:
        """Take no more work. Queued jobs end: cancelled, or failed with ``error``; with an
        ``error`` the admitted ones fail too (the model is gone), without one they run until
        the driver finishes them. Returns the queued barriers, which the driver answers."""
        with self._lock:
            self._closed = True
            barriers = tuple(b for b in self._queue if isinstance(b, Barrier))
            jobs = [j for j in self._queue if isinstance(j, Job)]
            if error is not None:
                jobs = [*self._admitted.values(), *jobs]
            for job in jobs:
                if error is not None:
                    self._fail(job, error)
                else:
                    self._queue.remove(job)
                    self._end(job, "cancelled")
            self._queue.clear()
            return Closed(tuple(jobs), barriers)

    # ---- sequences held by jobs and sessions --------------------------------------------------

    def running(self) -> list[Job[R]]:
        """Admitted jobs now in the batch (their sequence holds their context)."""
        with self._lock:
            return [j for j in self._admitted.values() if j.state is JobState.RUNNING]

    def admitted_seqs(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._admitted)

    def pinned(self, session: str) -> int | None:
        """The sequence pinned to ``session``, if any."""
        with self._lock:
            return self._pins.get(session)

    def unpin(self, session: str) -> int | None:
        """Release an idle session's pinned sequence; returns it, or None when there was
        none. A session whose job is admitted on it stays pinned (None): the caller ends
        the session when that job finishes. The caller clears or reuses the sequence's KV."""
        with self._lock:
            seq = self._pins.get(session)
            if seq is None or seq in self._admitted:
                return None
            del self._pins[session]
            del self._pinned_seq[seq]
            self._free.append(seq)
            return seq

    # ---- inside the lock -------------------------------------------------------------------------

    def _waiting(self) -> int:
        return sum(1 for item in self._queue if isinstance(item, Job))

    def _check_room(self) -> None:
        # Requests that will get a free sequence at once are not "waiting".
        if self._waiting() - len(self._free) >= self._max_queue:
            raise QueueFull(self._model_id, self._max_queue)

    def _session_busy(self, session: str) -> bool:
        return any(
            j.session == session for j in (*self._admitted.values(), *self._queue)
            if isinstance(j, Job)
        )  # fmt: skip

    def _phase(self) -> Phase:
        if not self._admitted:
            return "idle"
        if any(j.state is JobState.ADMITTING or j.feeding for j in self._admitted.values()):
            return "prefilling"
        return "generating"

    def _barrier_before(self, job: Job[R]) -> bool:
        for item in self._queue:
            if item is job:
                return False
            if isinstance(item, Barrier):
                return True
        return False

    def _take(self, job: Job[R], seq: int) -> None:
        job.state = JobState.ADMITTING
        job.seq = seq
        self._admitted[seq] = job

    def _natural_end(self, job: Job[R], is_eog: bool) -> FinishReason | None:
        if is_eog:
            return "stop"
        if job.max_tokens is not None and job.n_generated >= job.max_tokens:
            return "length"
        if job.n_context >= self._n_ctx:
            return "length"
        return None

    def _fail(self, job: Job[R], error: BaseException) -> None:
        if job.state is JobState.QUEUED:
            self._queue.remove(job)
        else:
            self._release(job, pin=False)
        self._end(job, error)

    def _release(self, job: Job[R], *, pin: bool) -> None:
        seq = job.seq
        if seq is None or self._admitted.get(seq) is not job:
            return
        del self._admitted[seq]
        if pin and job.session is not None:
            self._pins[job.session] = seq
            self._pinned_seq[seq] = job.session
        elif seq in self._pinned_seq:
            # A session job that ends without keeping its pin (cancelled, failed).
            session = self._pinned_seq.pop(seq)
            del self._pins[session]
            self._free.append(seq)
        else:
            self._free.append(seq)

    def _end(self, job: Job[R], outcome: FinishReason | BaseException) -> None:
        # A real check, not an assert: it must hold under ``python -O`` too.
        if job.state is JobState.DONE:
            raise RuntimeError("a job ends exactly once")
        job.state = JobState.DONE
        job.outcome = outcome
        job.cursor = []
        job.leader = None  # (a follower keeps no finished job alive)
