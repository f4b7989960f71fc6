"""A model's native thread: it owns the backend handle and runs steps back to back.

The thread never waits for the event loop. The loop reaches it through a command queue
(calls: tokenize, embed, adapter changes, evict ...) and through the scheduler, which both
share under the worker's lock; the thread sleeps only when it has nothing to run.
Everything the loop must learn (tokens, finished requests, saves to write, lookups to make)
goes into an outbox that is handed over with at most one wake-up of the loop at a time:
one wake-up per step carries every sequence's tokens, or several steps' when the loop is
slower than the model.

Between two steps the thread runs, in order: pending calls, cancellations (each finished
with its save), prefill-only requests that are done, cold saves at pause points, then
admissions in FIFO order. Only then does it plan and run the next step, so pack, unpack and
seq_rm never overlap a decode.

A failure that leaves the model's state in doubt (a raising ``step``, ``seq_rm`` ...) fails
every request of this model with a typed error, tells the worker, frees the model and ends
the thread. A failure of one request's own op (``SeqFailed``) ends that request only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._loop import Mail
from ..backends.types import Decode, LoadedModel, StepOp, StepResult
from ..cache.key import salted
from ..cache.port import Restore, SaveReason
from ..errors import BackendError, ErllamaError, ModelNotFound
from ..events import Event
from .adapters import AdapterSet
from .calls import Call
from .kv import SaveOrder, SequenceKV
from .output import PieceCache
from .request import Request
from .scheduler import Barrier, FinishReason, Job, JobState, Scheduler
from .sessions import Sessions
from .spans import Markers, markers_for

if TYPE_CHECKING:
    from .worker import ModelWorker

__all__ = ["ModelThread"]

log = logging.getLogger("erllama.model")


class ModelThread:
    """The native thread of one :class:`~erllama.model.worker.ModelWorker`."""

    def __init__(self, worker: ModelWorker) -> None:
        self.w = worker
        self.backend = worker.backend
        self.lock = worker.lock
        self.commands: queue.SimpleQueue[Call[Any] | Callable[[], None]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.thread = threading.Thread(
            target=self._main, name=f"erllama-model-{worker.id}", daemon=True
        )
        self.loaded: LoadedModel | None = None
        self.handle: Any = None
        self.sched: Scheduler | None = None
        self.kv: SequenceKV | None = None
        self.adapters: AdapterSet | None = None
        self.pieces: PieceCache | None = None
        self.eog: frozenset[int] = frozenset()
        self.markers = Markers()
        self.sessions = Sessions()
        self.stopping = False
        #: Set under the lock when the thread no longer takes calls.
        self.closed = False
        self._out: list[Mail] = []
        # Per step: decode rows still to be sampled, and sequences already streamed early.
        self._to_sample = 0
        self._early: set[int] = set()

    # ---- the loop's side ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def send(self, command: Call[Any] | Callable[[], None]) -> None:
        """Queue a command for the thread (raises ModelNotFound once it has ended)."""
        with self.lock:
            if self.closed:
                raise ModelNotFound(self.w.id)
            self.commands.put(command)
        self.wake.set()

    def stop(self) -> None:
        """Finish everything (shutdown saves), free the model and end the thread."""

        def stop() -> None:
            self.stopping = True

        with contextlib.suppress(ModelNotFound):  # already ended
            self.send(stop)

    # ---- the thread -----------------------------------------------------------------------

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` for the loop (sent at the next flush)."""
        self._out.append((fn, args))

    def flush(self) -> None:
        """Hand the outbox to the loop: one wake-up unless one is still pending."""
        if self._out:
            self.w.handoff.post_all(self._out)
            self._out.clear()

    def _main(self) -> None:
        try:
            try:
                loaded = self.backend.load(self.w.config)
            except BaseException as exc:
                self.post(self.w.on_loaded, None, exc)
                return
            self.loaded, self.handle = loaded, loaded.handle
            self.eog = loaded.eog_tokens
            try:
                self.markers = markers_for(
                    self.w.config,
                    loaded.chat_template,
                    lambda text: self.backend.tokenize(
                        self.handle, text, add_special=False, parse_special=True
                    ),
                )
            except BaseException as exc:
                self.post(self.w.on_loaded, None, exc)
                return
            self.post(self.w.on_loaded, loaded, None)
            self.flush()
            self._serve()
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._teardown()

    def begin(self, fingerprint: bytes, n_seq: int) -> None:
        """Called on the loop once the model's identity is known: build what the thread
        serves with. ``sched`` is set last: the thread starts serving when it sees it."""
        w = self.w
        cfg = w.config
        assert self.loaded is not None
        self.adapters = AdapterSet(w.id, self.backend, fingerprint)
        self.kv = SequenceKV(
            self.backend,
            self.handle,
            w.cache,
            w.policy,
            cfg.keep_live_kv,
            w.namespace,
            self.post,
        )
        detokenize = self.backend.direct_detokenize
        handle = self.handle
        self.pieces = PieceCache(lambda t: detokenize(handle, (t,)))
        self.sched = Scheduler(
            model_id=w.id,
            n_seq=n_seq,
            n_batch=cfg.n_batch,
            prefill_chunk=cfg.effective_prefill_chunk,
            n_ctx=self.loaded.n_ctx,
            max_queue=cfg.max_queue,
        )
        self.wake.set()

    def _serve(self) -> None:
        while True:
            self.wake.clear()
            ran = self._run_commands()
            sched = self.sched
            if sched is None:
                if self.stopping:
                    return
                if not ran:
                    self.wake.wait()
                continue
            progressed = self._between_steps(sched)
            # Answers, lookups and ended requests go out before a step that may be long.
            self.flush()
            with self.lock:
                ops = sched.plan()
            if ops:
                self._step(sched, ops)
            self.flush()
            if self.stopping and not sched.admitted:
                self._drop_queue(sched)
                for session in self.sessions.idle():
                    self.release_session(session, "shutdown")
                self.flush()
                return
            if not (ops or progressed or ran):
                self.wake.wait()

    def _run_commands(self) -> bool:
        ran = False
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            if isinstance(cmd, Call):
                self._run_call(cmd)
            else:
                cmd()

    def _run_call(self, call: Call[Any]) -> None:
        if call.start():
            result, error = call.run()
            self.post(call.resolve, result, error)

    # ---- between steps ----------------------------------------------------------------------

    def _between_steps(self, sched: Scheduler) -> bool:
        progressed = False
        with self.lock:
            cancels = sched.to_cancel()
        for job in cancels:
            self._finish(sched, job, "cancelled")
            progressed = True
        for job in sched.prefill_complete():
            self._finish(sched, job, "stop")
            progressed = True
        assert self.kv is not None
        for job in list(sched.admitted.values()):
            if job.state is JobState.RUNNING and job.paused:
                # The KV holds exactly the aligned prefix: the one moment to save it.
                req: Request = job.owner
                self._save(req, job, "cold")
                job.pause_at = None
                progressed = True
        if self.stopping:
            return progressed
        self._yield_sessions(sched)
        with self.lock:
            taken = sched.admit(self._choose)
        for item in taken:
            progressed = True
            if isinstance(item, Barrier):
                self._run_call(item.owner)
                with self.lock:
                    sched.barrier_done()
            else:
                self._admitted(item)
        return progressed

    def _choose(self, job: Job, free: Sequence[int]) -> int:
        assert self.kv is not None and self.adapters is not None
        req: Request = job.owner
        req.kv.fingerprint = salted(self.adapters.fingerprint, req.spec.cache_salt)
        return self.kv.choose(req.kv, free)

    def _admitted(self, job: Job) -> None:
        req: Request = job.owner
        req.clock.admitted = time.monotonic()
        self.w.last_used = req.clock.admitted
        job.sampler = req.sampler
        if job.session is not None and job.session in self.sessions:
            # Onto the session's own sequence: its live cells are the session's context.
            assert self.kv is not None and self.adapters is not None and job.seq is not None
            req.kv.fingerprint = salted(self.adapters.fingerprint, req.spec.cache_salt)
            self.kv.match(req.kv, job.seq, session=True)
            self.sessions.running(job.session)
        if self.w.cache.enabled:
            # The loop reads the best row (file reads off the loop and off this thread),
            # then answers with ``restored``; meanwhile this thread keeps stepping others.
            self.post(self.w.lookup, req)
        else:
            self._setup(job, None)

    def restored(self, req: Request, restore: Restore | None) -> None:
        """Command from the loop: the cache lookup for ``req`` is done."""
        job = req.job
        if job.state is not JobState.ADMITTING:
            if restore is not None:
                self.post(self.w.cache.release, restore)
            return
        if job.cancel_requested:
            if restore is not None:
                self.post(self.w.cache.release, restore)
            return  # finished as cancelled between steps
        self._setup(job, restore)

    def _setup(self, job: Job, restore: Restore | None) -> None:
        assert self.kv is not None and self.sched is not None and job.seq is not None
        req: Request = job.owner
        setup = self.kv.setup(req.kv, job.seq, restore)
        self.w.last_hit = req.kv.hit
        with self.lock:
            self.sched.start(
                job, n_context=setup.n_context, cursor=setup.cursor, pause_at=setup.pause_at
            )

    # ---- steps ------------------------------------------------------------------------------

    def _step(self, sched: Scheduler, ops: list[StepOp]) -> None:
        self._to_sample = sum(1 for op in ops if isinstance(op, Decode))
        self._early.clear()
        results = self.backend.direct_step(self.handle, ops, self._on_sampled)
        self._account(sched, ops, results)

    def _on_sampled(self, seq: int, token: int) -> None:
        """Mid-step, before the forward pass: stream the token now. Once every decoder of
        the step has sampled, the loop gets them all in one wake-up."""
        assert self.sched is not None
        job = self.sched.admitted.get(seq)
        if job is not None and not job.cancel_requested:
            self._emit(job.owner, token, token in self.eog)
            self._early.add(seq)
        self._to_sample -= 1
        if self._to_sample == 0:
            self.flush()

    def _emit(self, req: Request, token: int, eog: bool) -> None:
        """One sampled token of ``req``: its events, and what it changes for the next step
        (a stop string matched, a thinking span's end to feed, greedy tool-call syntax)."""
        if not eog:
            req.generated.append(token)
        events: list[Event] = []
        output = req.output
        output.token(token, eog, events)
        job = req.job
        if output.insert:
            tokens, output.insert = output.insert, ()
            assert self.sched is not None
            self.sched.insert(job, tokens)  # no room left: the request ends by length anyway
        job.greedy = output.greedy
        self._push(req, events)

    def _push(self, req: Request, events: list[Event]) -> None:
        if events:
            if req.clock.first_token is None:
                req.clock.first_token = time.monotonic()
            push = req.channel.push
            for ev in events:
                self._out.append((push, (ev,)))

    def _account(
        self, sched: Scheduler, ops: Sequence[StepOp], results: Sequence[StepResult]
    ) -> None:
        out = sched.apply(ops, results)
        now = time.monotonic()
        for job, tokens in out.fed:
            req: Request = job.owner
            req.kv.context.extend(tokens)
            if not job.cursor and req.clock.prefill_done is None:
                req.clock.prefill_done = now
        for job, error in out.failed:
            self._fail_request(sched, job, error)
        for s in out.sampled:
            job = s.job
            req = job.owner
            req.kv.context.append(s.token)
            eog = s.eog or s.token in self.eog
            if job.cancel_requested:
                continue  # finished as cancelled between steps; the token stays unsent
            if job.seq not in self._early:
                self._emit(req, s.token, eog)
            reason: FinishReason | None = "stop" if req.output.stop_sequence else None
            reason = reason or sched.natural_finish(s, is_eog=eog)
            if reason is not None:
                self._finish(sched, job, reason)
            elif self.kv is not None and self.kv.wants_continued(req.kv):
                self._save(req, job, "continued")

    # ---- ending requests -------------------------------------------------------------------

    def _save(
        self, req: Request, job: Job, reason: SaveReason, *, force: bool = False
    ) -> SaveOrder | None:
        assert self.kv is not None and job.seq is not None
        order = self.kv.save(req.kv, job.seq, reason, force=force)
        if order is not None and reason != "finish" and reason != "shutdown":
            self.post(self.w.save, req, order)
        return order

    def _finish(self, sched: Scheduler, job: Job, reason: FinishReason) -> None:
        """End an admitted job: its finish save, its sequence kept live or cleared, its
        sampler freed, then its terminal event (the loop writes the save first, so the
        ``finish_key`` in ``Done`` is already reserved)."""
        req: Request = job.owner
        events: list[Event] = []
        req.output.finish(events)
        self._push(req, events)
        if req.generated and self.pieces is not None:
            pieces = self.pieces
            try:
                req.reply_text = b"".join(pieces(t) for t in req.generated).decode("utf-8")
            except UnicodeDecodeError:
                req.reply_text = None
        order = None
        running = job.state is JobState.RUNNING
        if running and req.kv.context:
            order = self._save(
                req,
                job,
                "shutdown" if self.stopping else "finish",
                force=job.max_tokens == 0,  # prefill_only: the caller asked for this row
            )
        session = job.session
        pin = running and session is not None and session not in self.sessions.ending
        if running:
            assert self.kv is not None and job.seq is not None
            self.kv.release(req.kv, job.seq, keep=pin)
        self._free_sampler(req)
        with self.lock:
            sched.finish(job, reason, pin=pin)
            sched.take_ended()
        if pin:
            assert session is not None and job.seq is not None
            self.sessions.pinned(session, job.seq, len(req.kv.context))
        elif session is not None:
            self.sessions.dropped(session)
        self.post(self.w.finished, req, reason, order)

    def _fail_request(self, sched: Scheduler, job: Job, error: BaseException) -> None:
        """One request's own op failed; its sequence's KV is as before the step."""
        req: Request = job.owner
        err = (
            error
            if isinstance(error, ErllamaError)
            else BackendError(self.backend.name, "step", f"{type(error).__name__}: {error}")
        )
        if err is not error:
            err.__cause__ = error
        log.warning("model %s: request %s failed: %s", self.w.id, req.ref, err)
        if self.kv is not None and job.seq is not None:
            self.kv.release(req.kv, job.seq)
        self._free_sampler(req)
        with self.lock:
            sched.fail(job, err)
            sched.take_ended()
        if job.session is not None:
            self.sessions.dropped(job.session)
        self.post(self.w.failed, req, err)

    def _free_sampler(self, req: Request) -> None:
        if req.sampler is not None:
            sampler, req.sampler = req.sampler, None
            try:
                self.backend.sampler_free(self.handle, sampler)
            except ErllamaError:
                log.warning("model %s: freeing a sampler failed", self.w.id, exc_info=True)

    def free_sampler(self, sampler: Any) -> None:
        """Command: free the sampler of a request that never ran."""
        try:
            self.backend.sampler_free(self.handle, sampler)
        except ErllamaError:
            log.warning("model %s: freeing a sampler failed", self.w.id, exc_info=True)

    # ---- sessions ---------------------------------------------------------------------------

    def release_session(self, session: str, reason: SaveReason = "evict") -> SaveOrder | None:
        """Unpin an idle session's sequence after saving it (its cells stay live, so the
        session's next request may still find them). Running: released when it ends."""
        sched, kv = self.sched, self.kv
        assert sched is not None and kv is not None
        seq = sched.pins.get(session)
        if seq is None:
            self.sessions.dropped(session)
            return None
        if seq in sched.admitted:
            self.sessions.ending.add(session)
            return None
        order = kv.save_live(seq, reason)
        if order is not None:
            self.post(self.w.save_order, order)
        with self.lock:
            sched.unpin(session)
        self.sessions.dropped(session)
        return order

    def _yield_sessions(self, sched: Scheduler) -> None:
        """A request waits for a sequence and only idle sessions hold the rest: the least
        recently used session gives its sequence up (saved first, so it comes back warm)."""
        if sched.free or not sched.pins or sched.barrier is not None:
            return
        with self.lock:
            waiting = next(
                (j for j in sched.queue if isinstance(j, Job) and j.session not in sched.pins),
                None,
            )
        if waiting is None:
            return
        idle = self.sessions.idle()
        if idle:
            log.info(
                "model %s: session %r yields its sequence to a waiting request", self.w.id, idle[0]
            )
            self.release_session(idle[0])

    def _drop_queue(self, sched: Scheduler) -> None:
        """Stopping: whatever is still queued ends cancelled without running."""
        with self.lock:
            jobs = [j for j in sched.queue if isinstance(j, Job)]
            barriers = [b for b in sched.queue if isinstance(b, Barrier)]
            for job in jobs:
                sched.cancel(job)
            sched.queue.clear()
            sched.take_ended()
        gone = ModelNotFound(self.w.id)
        for job in jobs:
            self._free_sampler(job.owner)
            self.post(self.w.finished, job.owner, "cancelled", None)
        for b in barriers:
            if b.owner.start():
                self.post(b.owner.resolve, None, gone)

    # ---- failure and the end ---------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The model's state is in doubt: fail everything, tell the worker."""
        err = (
            exc
            if isinstance(exc, ErllamaError)
            else BackendError(self.backend.name, "serving", f"{type(exc).__name__}: {exc}")
        )
        if err is not exc:
            err.__cause__ = exc
        log.error("model %s failed: %s", self.w.id, err, exc_info=exc)
        sched = self.sched
        if sched is not None:
            with self.lock:
                barriers = sched.fail_all(err)
                ended = sched.take_ended()
            for job in ended:
                self.post(self.w.failed, job.owner, err)
            for b in barriers:
                call: Call[Any] = b.owner
                if call.start():
                    self.post(call.resolve, None, err)
            if sched.barrier is not None:
                self.post(sched.barrier.owner.resolve, None, err)
        self.post(self.w.model_failed, err)

    def _teardown(self) -> None:
        """Free the model, answer calls nobody will run, and tell the worker we are gone."""
        with self.lock:
            self.closed = True
        if self.handle is not None:
            try:
                self.backend.free(self.handle)
            except Exception:
                log.exception("model %s: freeing the backend failed", self.w.id)
            self.handle = None
            if self.adapters is not None:
                self.adapters.clear()
        gone = ModelNotFound(self.w.id)
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, Call) and cmd.start():
                self.post(cmd.resolve, None, gone)
        self.post(self.w.thread_exited)
        self.flush()
