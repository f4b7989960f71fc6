"""Batch scheduling as a synchronous state machine: no awaits, no threads, no backend.

A :class:`Job` is the scheduling half of one request. Jobs move

    QUEUED --admit--> ADMITTING --start--> RUNNING --finish/fail--> DONE
       \\______________________cancel (queued: at once)_______________/^

and every job reaches DONE exactly once, through :meth:`Scheduler._end`, which appends it to
:attr:`Scheduler.ended` for whoever drives the scheduler to deliver its terminal event.

The model thread drives it: :meth:`admit` between steps (FIFO, one free sequence each),
:meth:`plan` for the next step's ops, :meth:`apply` with the step's results. The event loop
calls :meth:`submit`, :meth:`cancel` and reads status; the worker serialises every call
with one lock, so nothing here needs to be thread-safe itself.

Invariants (checked by a hypothesis state machine in tests/model/test_scheduler_machine.py):

* a sequence belongs to at most one admitted job or session pin, and every sequence is
  free, admitted or pinned;
* jobs leave the queue in submission order (a session job whose sequence is pinned to it
  does not compete for a free one, so it does not wait behind others);
* a barrier (an exclusive control such as an adapter change) is taken only when no job is
  admitted, and nothing queued behind it is admitted before it is done.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from ..backends.types import Decode, Prefill, Prefilled, SeqFailed, StepOp, StepResult
from ..errors import QueueFull, SessionBusy

__all__ = ["Barrier", "Job", "JobState", "Sampling", "Scheduler", "StepOutcome"]

FinishReason = Literal["stop", "length", "cancelled"]


class JobState(enum.Enum):
    QUEUED = "queued"  # waiting in the FIFO queue
    ADMITTING = "admitting"  # holds a sequence; its prefix is being restored or cleared
    RUNNING = "running"  # in the batch: feeding tokens (prefill) or decoding
    DONE = "done"  # ended; ``outcome`` says how


@attrs.define(eq=False)
class Job:
    """One request as the scheduler sees it."""

    #: Tokens to generate: None = until end of generation or a full context; 0 = none
    #: (prefill only: the job ends when its prompt is in the KV).
    max_tokens: int | None
    #: Pins the sequence across requests (see :meth:`Scheduler.pin`).
    session: str | None = None
    #: The request this job schedules; opaque here.
    owner: Any = None
    state: JobState = JobState.QUEUED
    seq: int | None = None
    #: Tokens still to feed into the KV: the prompt's rest, or tokens the engine inserts
    #: (a thinking span's end marker). Empty while decoding.
    cursor: list[int] = attrs.Factory(list)
    #: Context length at which feeding pauses for a save (the cold save point), or None.
    pause_at: int | None = None
    #: Tokens now in the sequence's KV (restored + fed + generated).
    n_context: int = 0
    n_generated: int = 0
    #: The sampler the next decode uses (opaque; None = greedy), and whether it should pick
    #: greedily this time (inside a tool call's syntax).
    sampler: Any = None
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


@attrs.define(eq=False)
class Barrier:
    """An exclusive control in the queue: it runs when no job is admitted, before anything
    queued after it."""

    owner: Any = None


@attrs.frozen
class Sampling:
    """A token sampled for ``job`` in the last step (already in its KV)."""

    job: Job
    token: int
    eog: bool


@attrs.define
class StepOutcome:
    """One step's results, by job: tokens fed, tokens sampled (already in the KV), and
    jobs whose own op failed (the driver ends them; their KV is as before the step)."""

    fed: list[tuple[Job, Sequence[int]]] = attrs.Factory(list)
    sampled: list[Sampling] = attrs.Factory(list)
    failed: list[tuple[Job, BaseException]] = attrs.Factory(list)


class Scheduler:
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
    ) -> None:
        if n_batch < n_seq:
            raise ValueError(f"n_batch ({n_batch}) must be at least n_seq ({n_seq})")
        self.model_id = model_id
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.n_ctx = n_ctx
        self.max_queue = max_queue
        self.queue: deque[Job | Barrier] = deque()
        #: Free sequences, most recently freed last.
        self.free: list[int] = list(range(n_seq))[::-1]
        self.admitted: dict[int, Job] = {}
        #: Session id -> its pinned sequence, and the reverse.
        self.pins: dict[str, int] = {}
        self.pinned_seq: dict[int, str] = {}
        self.barrier: Barrier | None = None
        #: Jobs that reached DONE since the driver last took them.
        self.ended: list[Job] = []

    # ---- the loop's side ------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return sum(1 for item in self.queue if isinstance(item, Job))

    def submit(self, job: Job) -> None:
        """Queue ``job`` (QueueFull when ``max_queue`` requests would wait; SessionBusy when
        its session already has a job queued or admitted)."""
        if job.session is not None and self._session_busy(job.session):
            raise SessionBusy(self.model_id, job.session)
        if job.session not in self.pins:  # a pinned session's job needs no free sequence
            self.check_room()
        self.queue.append(job)

    def check_room(self) -> None:
        """QueueFull when one more request would make ``max_queue`` wait."""
        # Requests that will get a free sequence at once are not "waiting".
        if self.waiting - len(self.free) >= self.max_queue:
            raise QueueFull(self.model_id, self.max_queue)

    def submit_barrier(self, barrier: Barrier) -> None:
        self.queue.append(barrier)

    def withdraw_barrier(self, barrier: Barrier) -> bool:
        """Take a barrier out of the queue before it runs; False if it already started."""
        try:
            self.queue.remove(barrier)
        except ValueError:
            return False
        return True

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``. A queued job ends at once (True); an admitted one is marked and
        ends between steps (the driver finishes it). Idempotent."""
        if job.state is JobState.DONE:
            return False
        if job.state is JobState.QUEUED:
            self.queue.remove(job)
            self._end(job, "cancelled")
            return True
        job.cancel_requested = True
        return False

    def _session_busy(self, session: str) -> bool:
        return any(
            j.session == session for j in (*self.admitted.values(), *self.queue)
            if isinstance(j, Job)
        )  # fmt: skip

    # ---- status ---------------------------------------------------------------------------

    @property
    def phase(self) -> Literal["idle", "prefilling", "generating"]:
        if not self.admitted:
            return "idle"
        if any(j.state is JobState.ADMITTING or j.feeding for j in self.admitted.values()):
            return "prefilling"
        return "generating"

    @property
    def busy(self) -> bool:
        """Anything admitted, queued, or a barrier running."""
        return bool(self.admitted or self.queue or self.barrier is not None)

    # ---- the model thread's side ----------------------------------------------------------

    def admit(self, choose: Callable[[Job, Sequence[int]], int]) -> list[Job | Barrier]:
        """Take what may start now, in FIFO order: jobs while sequences are free
        (``choose(job, free)`` picks one of ``free``), and a barrier once nothing is
        admitted. Returned jobs are ADMITTING; a returned barrier must be ended with
        :meth:`barrier_done` before anything else is admitted."""
        taken: list[Job | Barrier] = []
        if self.barrier is not None:
            return taken
        # Session jobs whose sequence is pinned for them skip the line: they take no free
        # sequence from anyone queued before them.
        for item in [i for i in self.queue if isinstance(i, Job) and i.session in self.pins]:
            if self._head_barrier_before(item):
                break
            self.queue.remove(item)
            assert item.session is not None
            seq = self.pins[item.session]
            self._take(item, seq)
            taken.append(item)
        while self.queue:
            head = self.queue[0]
            if isinstance(head, Barrier):
                if self.admitted:
                    break
                self.queue.popleft()
                self.barrier = head
                taken.append(head)
                break
            if not self.free:
                break
            self.queue.popleft()
            seq = choose(head, tuple(self.free))
            self.free.remove(seq)
            self._take(head, seq)
            taken.append(head)
        return taken

    def _head_barrier_before(self, job: Job) -> bool:
        for item in self.queue:
            if item is job:
                return False
            if isinstance(item, Barrier):
                return True
        return False

    def _take(self, job: Job, seq: int) -> None:
        job.state = JobState.ADMITTING
        job.seq = seq
        self.admitted[seq] = job

    def barrier_done(self) -> None:
        self.barrier = None

    def start(
        self, job: Job, *, n_context: int, cursor: Sequence[int], pause_at: int | None
    ) -> None:
        """ADMITTING -> RUNNING: the sequence holds ``n_context`` tokens of the prompt and
        ``cursor`` is what remains to feed (never empty: a fully known prompt re-feeds its
        last token for fresh logits)."""
        assert job.state is JobState.ADMITTING
        job.state = JobState.RUNNING
        job.n_context = n_context
        job.cursor = list(cursor)
        job.pause_at = pause_at if pause_at is not None and pause_at > n_context else None

    def insert(self, job: Job, tokens: Sequence[int]) -> bool:
        """Feed ``tokens`` into ``job``'s sequence before it decodes again (they are not
        sampled: a thinking span's end marker, say). False, and nothing fed, when they and
        one more token would not fit the context."""
        if job.n_context + len(job.cursor) + len(tokens) + 1 > self.n_ctx:
            return False
        job.cursor.extend(tokens)
        return True

    def plan(self) -> list[StepOp]:
        """The next step's ops: every decoding job gets one token; feeding jobs share what is
        left of ``n_batch``, shortest remaining first, each at most ``prefill_chunk`` tokens
        (so a long prompt never starves decoders or a short prompt beside it) and never past
        its pause point."""
        budget = self.n_batch
        ops: list[StepOp] = []
        feeders: list[Job] = []
        for seq, job in self.admitted.items():
            if job.state is not JobState.RUNNING or job.cancel_requested or job.paused:
                continue
            if job.cursor:
                feeders.append(job)
            elif job.max_tokens != 0:
                ops.append(Decode(seq=seq, sampler=job.sampler, greedy=job.greedy))
                budget -= 1
        # Shortest remaining first: a short prompt that arrives while a long one prefills is
        # fed whole at once (and samples next step) instead of waiting for the long prompt's
        # slices to end; the long one takes what is left, and it always gets the rest of the
        # batch, since feeders are at most n_seq and each takes at most prefill_chunk.
        feeders.sort(key=lambda j: len(j.cursor))
        for job in feeders:
            if budget <= 0:
                break
            n = min(len(job.cursor), budget, self.prefill_chunk)
            if job.pause_at is not None:
                n = min(n, job.pause_at - job.n_context)
            # Logits only where the next decode samples from: the last token fed.
            logits = n == len(job.cursor) and job.max_tokens != 0
            assert job.seq is not None
            ops.append(Prefill(seq=job.seq, tokens=tuple(job.cursor[:n]), logits=logits))
            budget -= n
        return ops

    def apply(self, ops: Sequence[StepOp], results: Sequence[StepResult]) -> StepOutcome:
        """Account one step's results (see :class:`StepOutcome`). Raises ValueError for a
        result that does not answer an op of this step, or an op left unanswered."""
        sent = {op.seq: op for op in ops}
        out = StepOutcome()
        for res in results:
            op = sent.pop(res.seq, None)
            job = self.admitted.get(res.seq)
            if op is None or job is None:
                raise ValueError(f"step result for sequence {res.seq}, which had no op")
            if isinstance(res, SeqFailed):
                out.failed.append((job, res.error))
            elif isinstance(res, Prefilled):
                if not isinstance(op, Prefill) or res.n_tokens != len(op.tokens):
                    raise ValueError(f"prefill result does not match its op on seq {res.seq}")
                del job.cursor[: res.n_tokens]
                job.n_context += res.n_tokens
                out.fed.append((job, op.tokens))
            else:
                if not isinstance(op, Decode):
                    raise ValueError(f"sampled result for a prefill op on seq {res.seq}")
                job.n_context += 1
                job.n_generated += 1
                out.sampled.append(Sampling(job, res.token, res.eog))
        if sent:
            raise ValueError(f"no step result for sequences {sorted(sent)}")
        return out

    def natural_finish(self, s: Sampling, *, is_eog: bool) -> FinishReason | None:
        """Why ``s.job`` ends after this token, if it does: end of generation, its
        ``max_tokens``, or a full context."""
        job = s.job
        if is_eog:
            return "stop"
        if job.max_tokens is not None and job.n_generated >= job.max_tokens:
            return "length"
        if job.n_context >= self.n_ctx:
            return "length"
        return None

    def prefill_complete(self) -> list[Job]:
        """Prefill-only jobs whose prompt is now entirely in the KV."""
        return [
            j for j in self.admitted.values()
            if j.state is JobState.RUNNING and j.max_tokens == 0 and not j.cursor
        ]  # fmt: skip

    def to_cancel(self) -> list[Job]:
        """Admitted jobs whose cancellation the driver should carry out now."""
        return [j for j in self.admitted.values() if j.cancel_requested]

    def finish(self, job: Job, reason: FinishReason, *, pin: bool = False) -> None:
        """End an admitted job. Its sequence is freed, or pinned to ``job.session`` when
        ``pin`` (the KV stays for the session's next request)."""
        self._release(job, pin=pin)
        self._end(job, reason)

    def fail(self, job: Job, error: BaseException) -> None:
        """End one job with ``error`` (queued or admitted); the model carries on."""
        if job.state is JobState.QUEUED:
            self.queue.remove(job)
        elif job.state is not JobState.DONE:
            self._release(job, pin=False)
        self._end(job, error)

    def fail_all(self, error: BaseException) -> list[Barrier]:
        """The model is gone: end every job with ``error``; return queued barriers, which
        the driver must answer."""
        barriers = [b for b in self.queue if isinstance(b, Barrier)]
        for job in [*self.admitted.values(), *(j for j in self.queue if isinstance(j, Job))]:
            self.fail(job, error)
        self.queue.clear()
        return barriers

    def unpin(self, session: str) -> int | None:
        """Release an idle session's pinned sequence; returns it, or None when there was
        none. A session whose job is admitted on it stays pinned (None): the caller ends
        the session when that job finishes. The caller clears or reuses the sequence's KV."""
        seq = self.pins.get(session)
        if seq is None or seq in self.admitted:
            return None
        del self.pins[session]
        del self.pinned_seq[seq]
        self.free.append(seq)
        return seq

    def take_ended(self) -> list[Job]:
        ended, self.ended = self.ended, []
        return ended

    def _release(self, job: Job, *, pin: bool) -> None:
        seq = job.seq
        if seq is None or self.admitted.get(seq) is not job:
            return
        del self.admitted[seq]
        if pin and job.session is not None:
            self.pins[job.session] = seq
            self.pinned_seq[seq] = job.session
        elif seq in self.pinned_seq:
            # A session job that ends without keeping its pin (cancelled, failed).
            session = self.pinned_seq.pop(seq)
            del self.pins[session]
            self.free.append(seq)
        else:
            self.free.append(seq)

    def _end(self, job: Job, outcome: FinishReason | BaseException) -> None:
        assert job.state is not JobState.DONE, "a job ends exactly once"
        job.state = JobState.DONE
        job.outcome = outcome
        job.cursor = []
        self.ended.append(job)
