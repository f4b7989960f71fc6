"""A model's native thread: it owns the backend handle and runs steps back to back.

The thread never waits for the event loop. The loop reaches it through the model's gate
(:mod:`.gate`: commands, calls, and the scheduler, which is thread-safe on its own); the
thread sleeps only when it has nothing to run. Everything the loop must learn (tokens,
finished requests, saves to write, lookups to make) goes into an outbox of calls on the
:class:`~erllama.model.sides.LoopSide`, handed over with at most one wake-up of the loop at a
time: one wake-up per step carries every sequence's tokens, or several steps' when the loop
is slower than the model. What the loop reads of the thread's state it reads from the
snapshots the thread publishes on the gate (:mod:`.snapshot`).

Between two steps the thread runs, in order: pending commands, aborted requests (each
finished with its save), prefill-only requests that are done, cold saves at pause points,
then admissions in FIFO order. Only then does it plan and run the next step, so pack, unpack
and seq_rm never overlap a decode.

A failure that leaves the model's state in doubt (a raising ``step``, ``seq_rm`` ...) fails
every request of this model with a typed error, tells the loop, frees the model and ends the
thread. A failure of one request's own op (``SeqFailed``) ends that request only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .._loop import LoopHandoff, Mail
from ..backends.types import Decode, LoadedModel, Prefill, Sampled, StepResult
from ..cache.key import Namespace, salted
from ..cache.port import CachePort, Restore, SaveReason
from ..config import CachePolicy, ModelConfig
from ..errors import BackendError, ErllamaError, ModelNotFound
from ..events import Event
from ..plugins import Backend
from ..speculative.cost import PassCost
from ..speculative.registry import DrafterPlugin
from .adapters import AdapterSet
from .calls import Call
from .explain import explain
from .gate import UNLOAD_WAIT_S, ModelGate
from .kv import SaveOrder, SequenceKV
from .output import PieceCache
from .request import Request
from .scheduler import Barrier, FinishReason, Job, JobState, Scheduler, StepPlan
from .sessions import Sessions
from .sides import LoopSide, Orders
from .snapshot import LivePrefix, ModelFacts, ThreadView
from .spans import Markers, markers_for

__all__ = ["ModelThread"]

log = logging.getLogger("erllama.model")

RequestJob = Job[Request]


class ModelThread:
    """The native thread of one model. It implements :class:`~erllama.model.sides.OnThread`
    for the calls it runs."""

    def __init__(
        self,
        model_id: str,
        gate: ModelGate,
        loop: LoopSide,
        backend: Backend,
        config: ModelConfig,
        cache: CachePort,
        policy: CachePolicy,
        drafter: DrafterPlugin | None = None,
    ) -> None:
        self._id = model_id
        #: The drafter plugin of ``config.speculative``, and its per-model state (made and
        #: freed on this thread, around the model's own life).
        self._drafter = drafter
        self.drafter_state: Any = None
        self._gate = gate
        self._loop = loop
        self._backend = backend
        self._config = config
        self._cache = cache
        self._policy = policy
        self._thread = threading.Thread(
            target=self._main, name=f"erllama-model-{model_id}", daemon=True
        )
        self._handoff: LoopHandoff | None = None
        self._handle: Any = None
        self._loaded: LoadedModel | None = None
        self._sched: Scheduler[Request, Call[Any]] | None = None
        self._kv: SequenceKV | None = None
        self._adapters: AdapterSet | None = None
        self._pieces: PieceCache | None = None
        self._eog: frozenset[int] = frozenset()
        self._markers = Markers()
        self._sessions = Sessions(self._sessions_changed)
        self._view = ThreadView()
        self._stopping = False
        self._running_call: Call[Any] | None = None
        self._out: list[Mail] = []
        #: What a draft token adds to a decode step (speculative decoding), learnt here.
        spec = config.speculative
        self.pass_cost = PassCost(spec.token_cost if spec is not None else None)
        # Per step: decode rows still to be sampled, and sequences already streamed early.
        self._to_sample = 0
        self._early: set[int] = set()

    # ---- the loop's side ------------------------------------------------------------------

    def start(self, handoff: LoopHandoff) -> None:
        self._handoff = handoff
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        """Finish everything (shutdown saves), free the model and end the thread."""
        with contextlib.suppress(ModelNotFound):  # already ended
            self._gate.send(self._set_stopping)

    def restore(self, req: Request, restore: Restore | None) -> None:
        """The cache lookup for ``req`` is done: set it up between steps (or let the cache
        have its row back when the thread has ended)."""
        try:
            self._gate.send(_Restored(self, req, restore))
        except ModelNotFound:
            if restore is not None:
                self._cache.release(restore)

    def free_sampler_later(self, sampler: object) -> None:
        """Free the sampler of a request that ended before it was admitted."""
        with contextlib.suppress(ModelNotFound):  # the model is gone, its samplers with it
            self._gate.send(_FreeSampler(self, sampler))

    # ---- OnThread: what calls may use ---------------------------------------------------------

    @property
    def handle(self) -> Any:
        return self._handle

    @property
    def adapters(self) -> AdapterSet:
        assert self._adapters is not None
        return self._adapters

    def begin(
        self, fingerprint: bytes, namespace: Callable[[bytes], Namespace], n_seq: int
    ) -> None:
        """The model's identity is known: build what the thread serves with and publish it.
        The scheduler goes last: the loop takes requests once it sees it."""
        cfg, loaded = self._config, self._loaded
        assert loaded is not None
        self._adapters = AdapterSet(self._id, self._backend, fingerprint, self._adapters_changed)
        # Tokens per prompt chunk: G, at least 64 rows with padded chunks.
        chunk = loaded.chunk_rows(cfg.effective_prefill_chunk)
        self._kv = SequenceKV(
            self._backend,
            self._handle,
            self._cache,
            self._policy,
            cfg.keep_live_kv,
            namespace,
            self.post,
            self._live_changed,
            loaded.reuse_grid(cfg.effective_prefill_chunk),
            batch_invariant=loaded.batch_invariant,
            refeed_replies=cfg.refeed_replies,
            exact_limit=loaded.fillers_fit_until,
            refeed_chunk=chunk,
        )
        detokenize, handle = self._backend.direct_detokenize, self._handle
        self._pieces = PieceCache(lambda t: detokenize(handle, (t,)))
        self._publish(fingerprint=fingerprint, last_used=time.monotonic())
        self._gate.facts = ModelFacts(
            loaded=loaded,
            fingerprint=fingerprint,
            markers=self._markers,
            pieces=self._pieces,
            n_seq=n_seq,
        )
        self._sched = Scheduler(
            model_id=self._id,
            n_seq=n_seq,
            n_batch=cfg.n_batch,
            prefill_chunk=chunk,
            n_ctx=loaded.n_ctx,
            max_queue=cfg.max_queue,
            pad_zone=loaded.fillers_fit_until,
            batch_invariant=loaded.batch_invariant,
        )
        self._gate.scheduler = self._sched

    def pack_running(self) -> Orders:
        sched, kv = self._sched, self._kv
        assert sched is not None and kv is not None
        out: Orders = []
        for job in sched.running():
            req = job.owner
            if req.kv.context and job.seq is not None:
                order = kv.save(req.kv, job.seq, "evict")
                if order is not None:
                    out.append((req, order))
        return out

    def pack_all(self) -> Orders:
        sched, kv = self._sched, self._kv
        assert sched is not None and kv is not None
        out: Orders = []
        by_seq = {job.seq: job for job in sched.running()}
        admitted = sched.admitted_seqs()
        for seq in range(sched.n_seq):
            job = by_seq.get(seq)
            order = None
            if job is not None:
                if job.owner.kv.context:
                    order = kv.save(job.owner.kv, seq, "evict")
                    if order is not None:
                        out.append((job.owner, order))
            elif seq not in admitted and seq in kv.live:
                order = kv.save_live(seq, "evict")
                if order is not None:
                    out.append((None, order))
        return out

    def release_session(self, session: str, reason: SaveReason = "evict") -> None:
        """Unpin an idle session's sequence after saving it (its cells stay live, so the
        session's next request may still find them). Running: released when it ends."""
        sched, kv = self._sched, self._kv
        assert sched is not None and kv is not None
        seq = sched.pinned(session)
        if seq is None:
            self._sessions.dropped(session)
            return
        if seq in sched.admitted_seqs():
            self._sessions.ending.add(session)
            return
        order = kv.save_live(seq, reason)
        if order is not None:
            self.post(self._loop.save, None, order)
        sched.unpin(session)
        self._sessions.dropped(session)

    def expire_sessions(self, ttl_s: float) -> None:
        for session in self._sessions.idle(older_than=ttl_s):
            log.info("model %s: session %r idle for %.0f s; released", self._id, session, ttl_s)
            self.release_session(session)

    # ---- snapshots for the loop ---------------------------------------------------------------

    def _publish(self, **changes: Any) -> None:
        self._view = attrs.evolve(self._view, **changes)
        self._gate.view = self._view

    def _adapters_changed(self, adapters: AdapterSet) -> None:
        # A reply fed again now would be computed under the new set: not its cells.
        if self._kv is not None:
            self._kv.refeed.clear()
        self._publish(fingerprint=adapters.fingerprint, adapters=adapters.info)

    def _sessions_changed(self, sessions: Sessions) -> None:
        self._publish(sessions=sessions.info)

    def _live_changed(self, live: tuple[LivePrefix, ...]) -> None:
        self._publish(live=live)

    # ---- the thread -----------------------------------------------------------------------

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` for the loop (sent at the next flush)."""
        self._out.append((fn, args))

    def flush(self) -> None:
        """Hand the outbox to the loop: one wake-up unless one is still pending."""
        if self._out:
            assert self._handoff is not None
            self._handoff.post_all(self._out)
            self._out.clear()

    def _set_stopping(self) -> None:
        self._stopping = True

    def _main(self) -> None:
        try:
            try:
                loaded = self._backend.load(self._config)
            except BaseException as exc:
                self.post(self._loop.loaded, None, exc)
                return
            self._loaded, self._handle = loaded, loaded.handle
            self._eog = loaded.eog_tokens
            self._gate.handle = loaded.handle
            try:
                self._markers = markers_for(
                    self._config,
                    loaded.chat_template,
                    lambda text: self._backend.tokenize(
                        self._handle, text, add_special=False, parse_special=True
                    ),
                )
                spec = self._config.speculative
                if self._drafter is not None and spec is not None:
                    self.drafter_state = self._drafter.load(spec, loaded)
            except BaseException as exc:
                self.post(self._loop.loaded, None, exc)
                return
            self.post(self._loop.loaded, loaded, None)
            self.flush()
            self._serve()
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._teardown()

    def _serve(self) -> None:
        wake = self._gate.wake
        while True:
            wake.clear()
            ran = self._run_commands()
            sched = self._sched
            if sched is None:
                if self._stopping:
                    return
                if not ran:
                    wake.wait()
                continue
            progressed = self._between_steps(sched)
            # Answers, lookups and ended requests go out before a step that may be long.
            self.flush()
            plan = sched.schedule()
            if plan:
                self._step(sched, plan)
            self.flush()
            if self._stopping and not sched.admitted_seqs():
                self._drop_queue(sched)
                for session in self._sessions.idle():
                    self.release_session(session, "shutdown")
                self.flush()
                return
            if not (plan or progressed or ran):
                if not self._stopping and self._refeed(sched):
                    continue
                wake.wait()

    def _refeed(self, sched: Scheduler[Request, Call[Any]]) -> bool:
        """Nothing else to do: feed one chunk of a finished request's reply again.

        A reply's cells were decoded one token at a time, and a prompt's last partial cell
        in a short chunk, so the exactness rule keeps neither (model/kv.py). The next turn
        of a conversation starts with them, though: fed again now, one grid cell per call at
        its grid position, they are what a cold prefill computes there, and that turn
        restores them instead of prefilling them (with padded chunks: a whole prefill chunk
        per call, computed exactly wherever it starts). One chunk at a time, only while idle:
        any request that arrives goes first, and takes its sequence as it stands."""
        kv = self._kv
        if kv is None or not kv.refeed:
            return False
        found = kv.refeed_next(sched.admitted_seqs())
        if found is None:
            return False
        seq, chunk = found
        try:
            self._backend.direct_step(
                self._handle, [Prefill(seq=seq, tokens=chunk, logits=False)], None
            )
        except Exception:
            # The sequence's cells past its exact prefix are now unknown: drop them all.
            log.warning("model %s: feeding a reply again failed", self._id, exc_info=True)
            kv.forget(seq)
            with contextlib.suppress(Exception):
                self._backend.seq_rm(self._handle, seq, 0, None)
            return True
        order = kv.refed(seq, chunk, "finish")
        if order is not None:
            self.post(self._loop.save, None, order)
            self.flush()
        return True

    def _run_commands(self) -> bool:
        ran = False
        while (cmd := self._gate.next_command()) is not None:
            ran = True
            if isinstance(cmd, Call):
                self._run_call(cmd)
            else:
                cmd()
        return ran

    def _run_call(self, call: Call[Any]) -> None:
        if call.start():
            self._running_call = call
            result, error = call.run(self)
            self._running_call = None
            self.post(call.resolve, result, error)

    # ---- between steps ----------------------------------------------------------------------

    def _between_steps(self, sched: Scheduler[Request, Call[Any]]) -> bool:
        todo = sched.housekeeping()
        progressed = bool(
            todo.aborted or todo.prefilled or todo.paused or todo.shares or todo.orphans
        )
        # Shares first: every leader still holds its KV (none has been finished yet).
        for job in todo.shares:
            self._take_shared(sched, job)
        for job in todo.orphans:
            sched.go_alone(job)
            job.owner.clock.shared = time.monotonic()
            self._hit_final(job.owner)
        for job in todo.aborted:
            self._finish(sched, job, "cancelled")
        for job in todo.prefilled:
            self._finish(sched, job, "stop")
        for job in todo.paused:
            # The KV holds exactly the aligned prefix: the one moment to save it.
            self._save(job.owner, job, "cold")
            sched.resume(job)
        if self._stopping:
            return progressed
        if sched.starved():
            self._yield_session()
        for item in sched.admit(self._choose):
            progressed = True
            if isinstance(item, Barrier):
                self._run_call(item.owner)
                sched.barrier_done()
            else:
                self._admitted(item)
        return progressed

    def _choose(self, job: RequestJob, free: Sequence[int]) -> int:
        assert self._kv is not None and self._adapters is not None
        req = job.owner
        req.kv.fingerprint = salted(self._adapters.fingerprint, req.spec.cache_salt)
        return self._kv.choose(req.kv, free)

    def _admitted(self, job: RequestJob) -> None:
        req = job.owner
        req.clock.admitted = time.monotonic()
        self._publish(last_used=req.clock.admitted)
        if job.session is not None and job.session in self._sessions:
            # Onto the session's own sequence: its live cells are the session's context.
            assert self._kv is not None and self._adapters is not None and job.seq is not None
            req.kv.fingerprint = salted(self._adapters.fingerprint, req.spec.cache_salt)
            self._kv.match(req.kv, job.seq, session=True)
            self._sessions.running(job.session)
        if self._cache.enabled:
            # The loop reads the best row (file reads off the loop and off this thread),
            # then answers with ``restore``; meanwhile this thread keeps stepping others.
            self.post(self._loop.lookup, req)
        else:
            self._setup(job, None)

    def restored(self, req: Request, restore: Restore | None) -> None:
        """The loop's lookup for ``req`` is done (a command)."""
        job = req.job
        if job.state is not JobState.ADMITTING or job.cancel_requested:
            # Ended meanwhile, or finished as cancelled between steps.
            if restore is not None:
                self.post(self._cache.release, restore)
            return
        self._setup(job, restore)

    def _setup(self, job: RequestJob, restore: Restore | None) -> None:
        assert self._kv is not None and self._sched is not None and job.seq is not None
        req = job.owner
        setup = self._kv.setup(req.kv, job.seq, restore)
        req.clock.set_up = time.monotonic()
        leader, share_at = self._leader_for(job, setup.n_context)
        if leader is None:
            self._hit_final(req)
        self._publish(last_hit=req.kv.hit)
        try:
            req.kv.explain = explain(
                req.probe if self._cache.enabled else None,
                req.kv.hit,
                req.spec.prompt,
                self._kv.grid,
                self._decode,
            )
        except Exception:  # a report, never worth failing the request over
            log.exception("model %s: explaining the cache hit failed", self._id)
        self._sched.start(
            job,
            n_context=setup.n_context,
            cursor=setup.cursor,
            pause_at=setup.pause_at,
            leader=leader,
            share_at=share_at,
        )

    def _leader_for(self, job: RequestJob, start: int) -> tuple[RequestJob | None, int]:
        """The running request whose prompt shares the most whole grid cells with this
        one's beyond what it already holds (ties: the one furthest along), and how many."""
        assert self._kv is not None and self._sched is not None
        if not self._config.share_prefill:
            return None, 0
        best: tuple[int, int, RequestJob | None] = (0, 0, None)
        for other in self._sched.leaders():
            if other is job:
                continue
            point = self._kv.share_point(job.owner.kv, other.owner.kv, start)
            if point and (point, other.n_context) > best[:2]:
                best = (point, other.n_context, other)
        return best[2], best[0]

    def _take_shared(self, sched: Scheduler[Request, Call[Any]], job: RequestJob) -> None:
        """A follower's leader holds their shared prefix: copy it over, feed the rest."""
        assert self._kv is not None and job.seq is not None and job.leader is not None
        leader_seq = job.leader.seq
        assert leader_seq is not None
        req = job.owner
        req.clock.shared = time.monotonic()
        n = job.share_at
        if self._kv.take(req.kv, job.seq, leader_seq, n):
            sched.shared(job, n_context=n, cursor=req.kv.prompt[n:])
        else:
            sched.shared(job, n_context=0, cursor=req.kv.prompt)
        self._hit_final(req)

    def _hit_final(self, req: Request) -> None:
        """The request's hit is what it will run with: publish and explain it."""
        assert self._kv is not None
        self._publish(last_hit=req.kv.hit)
        try:
            req.kv.explain = explain(
                req.probe if self._cache.enabled else None,
                req.kv.hit,
                req.spec.prompt,
                self._kv.grid,
                self._decode,
            )
        except Exception:  # a report, never worth failing the request over
            log.exception("model %s: explaining the cache hit failed", self._id)

    def _decode(self, ids: Sequence[int]) -> str:
        """Excerpt text for an explanation, through the piece cache (this thread's)."""
        pieces = self._pieces
        if pieces is None:
            return ""
        return b"".join(pieces(t) for t in ids).decode("utf-8", errors="replace")

    # ---- steps ------------------------------------------------------------------------------

    def _step(self, sched: Scheduler[Request, Call[Any]], plan: StepPlan) -> None:
        self._to_sample = sum(1 for op in plan.ops if isinstance(op, Decode))
        self._early.clear()
        t0 = time.perf_counter()
        results = self._backend.direct_step(self._handle, plan.ops, self._on_sampled)
        if self._to_sample == len(plan.ops):  # decode rows only: what a draft adds shows
            extra = sum(r.drafted for r in results if isinstance(r, Sampled))
            self.pass_cost.observe(len(plan.ops), extra, time.perf_counter() - t0)
        self._account(sched, plan, results)

    def _on_sampled(self, seq: int, token: int) -> None:
        """Mid-step, before the forward pass: stream the token now. Once every decoder of
        the step has sampled, the loop gets them all in one wake-up."""
        assert self._sched is not None
        job = self._sched.job_on(seq)
        # A job that asked for log-probabilities streams at the end of the step, with them.
        if job is not None and not job.cancel_requested and job.logprobs is None:
            self._emit(job, token, token in self._eog)
            self._early.add(seq)
        self._to_sample -= 1
        if self._to_sample == 0:
            self.flush()

    def _emit(
        self,
        job: RequestJob,
        token: int,
        eog: bool,
        logprob: float | None = None,
        top: tuple[tuple[int, float], ...] = (),
    ) -> None:
        """One sampled token of ``job``: its events, and what it changes for the next step
        (a stop string matched, a thinking span's end to feed, greedy tool-call syntax)."""
        req = job.owner
        if not eog:
            req.generated.append(token)
        events: list[Event] = []
        output = req.output
        output.token(token, eog, events, logprob, top)
        assert self._sched is not None
        if output.insert:
            tokens, output.insert = output.insert, ()
            self._sched.insert(job, tokens)  # no room left: the request ends by length anyway
        if job.greedy != output.greedy:
            self._sched.set_greedy(job, output.greedy)
        self._push(req, events)

    def _push(self, req: Request, events: list[Event]) -> None:
        if events:
            if req.clock.first_token is None:
                req.clock.first_token = time.monotonic()
            push = req.channel.push
            for ev in events:
                self._out.append((push, (ev,)))

    def _account(
        self,
        sched: Scheduler[Request, Call[Any]],
        plan: StepPlan,
        results: Sequence[StepResult],
    ) -> None:
        out = sched.update_from_output(plan, results, self._eog)
        now = time.monotonic()
        for job, tokens in out.fed:
            req = job.owner
            req.kv.context.extend(tokens)
            if not job.cursor and req.clock.prefill_done is None:
                req.clock.prefill_done = now
        for job, error in out.failed:
            self._fail_request(sched, job, error)
        # Every sampled token is in its sequence's KV (a job's accepted draft tokens too,
        # even past a stop string that ends it at an earlier one).
        for s in out.sampled:
            s.job.owner.kv.context.append(s.token)
        first: set[int] = set()
        for s in out.sampled:
            job = s.job
            if job.cancel_requested or job.state is JobState.DONE:
                # Finished as cancelled between steps (the token stays unsent), or ended by
                # a stop string at an earlier token of this step.
                continue
            req = job.owner
            # The step's first token of a job may have been streamed before the forward pass.
            streamed = job.seq in self._early and id(job) not in first
            first.add(id(job))
            if not streamed:
                self._emit(job, s.token, s.eog, s.logprob, s.top_logprobs)
            # A stop string ends it before any natural end (the scheduler's).
            reason: FinishReason | None = "stop" if req.output.stop_sequence else s.finish
            if reason is not None:
                self._finish(sched, job, reason)

    # ---- ending requests -------------------------------------------------------------------

    def _save(
        self, req: Request, job: RequestJob, reason: SaveReason, *, force: bool = False
    ) -> SaveOrder | None:
        assert self._kv is not None and job.seq is not None
        order = self._kv.save(req.kv, job.seq, reason, force=force)
        if order is not None and reason != "finish" and reason != "shutdown":
            self.post(self._loop.save, req, order)
        return order

    def _finish(
        self, sched: Scheduler[Request, Call[Any]], job: RequestJob, reason: FinishReason
    ) -> None:
        """End an admitted job: its finish save, its sequence kept live or cleared, its
        sampler freed, then its terminal event (the loop writes the save first, so the
        ``finish_key`` in ``Done`` is already reserved)."""
        req = job.owner
        events: list[Event] = []
        req.output.finish(events)
        self._push(req, events)
        if req.generated and self._pieces is not None:
            pieces = self._pieces
            try:
                req.reply_text = b"".join(pieces(t) for t in req.generated).decode("utf-8")
            except UnicodeDecodeError:
                req.reply_text = None
        order = None
        running = job.state is JobState.RUNNING
        session = job.session
        pin = running and session is not None and session not in self._sessions.ending
        if running:
            # The finish save first (so the loop reserves its key before Done), of the
            # sequence cut back to its exactly-computed cells, which stay live.
            assert self._kv is not None and job.seq is not None
            order = self._kv.finish(
                req.kv,
                job.seq,
                "shutdown" if self._stopping else "finish",
                force=job.max_tokens == 0,  # prefill_only: the caller asked for this row
                keep=pin,
            )
        self._free_sampler(job.sampler)
        sched.finish_request(job, reason, pin=pin)
        if pin:
            assert session is not None and job.seq is not None
            assert self._kv is not None
            self._sessions.pinned(session, job.seq, self._kv.exact_len(req.kv))
        elif session is not None:
            self._sessions.dropped(session)
        self.post(self._loop.finished, req, reason, order)

    def _fail_request(
        self, sched: Scheduler[Request, Call[Any]], job: RequestJob, error: BaseException
    ) -> None:
        """One request's own op failed; its sequence's KV is as before the step."""
        req = job.owner
        err = _typed(error, self._backend.name, "step")
        log.warning("model %s: request %s failed: %s", self._id, req.ref, err)
        if self._kv is not None and job.seq is not None:
            self._kv.release(req.kv, job.seq)
        self._free_sampler(job.sampler)
        sched.fail(job, err)
        if job.session is not None:
            self._sessions.dropped(job.session)
        self.post(self._loop.failed, req, err)

    def free_sampler(self, sampler: object) -> None:
        self._free_sampler(sampler)

    def release_later(self, restore: Restore) -> None:
        """The cache gets a row it handed over back (on the loop)."""
        self.post(self._cache.release, restore)

    def _free_sampler(self, sampler: object) -> None:
        if sampler is None:
            return
        try:
            self._backend.sampler_free(self._handle, sampler)
        except ErllamaError:
            log.warning("model %s: freeing a sampler failed", self._id, exc_info=True)

    # ---- sessions ---------------------------------------------------------------------------

    def _yield_session(self) -> None:
        """A request waits for a sequence and only idle sessions hold the rest: the least
        recently used session gives its sequence up (saved first, so it comes back warm)."""
        idle = self._sessions.idle()
        if idle:
            log.info(
                "model %s: session %r yields its sequence to a waiting request", self._id, idle[0]
            )
            self.release_session(idle[0])

    def _drop_queue(self, sched: Scheduler[Request, Call[Any]]) -> None:
        """Stopping: whatever is still queued ends cancelled without running."""
        closed = sched.close()
        gone = ModelNotFound(self._id)
        for job in closed.jobs:
            self._free_sampler(job.sampler)
            self.post(self._loop.finished, job.owner, "cancelled", None)
        for b in closed.barriers:
            if b.owner.start():
                self.post(b.owner.resolve, None, gone)

    # ---- failure and the end ---------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The model's state is in doubt: fail everything, tell the loop."""
        err = _typed(exc, self._backend.name, "serving")
        log.error("model %s failed: %s", self._id, err, exc_info=exc)
        sched = self._sched
        if sched is not None:
            closed = sched.close(err)
            for job in closed.jobs:
                self.post(self._loop.failed, job.owner, err)
            for b in closed.barriers:
                if b.owner.start():
                    self.post(b.owner.resolve, None, err)
        if self._running_call is not None:
            self.post(self._running_call.resolve, None, err)
            self._running_call = None
        self.post(self._loop.model_failed, err)

    def _teardown(self) -> None:
        """Free the model once no call off the thread uses its handle, answer commands
        nobody will run, and tell the loop we are gone."""
        left = self._gate.close()
        if self._handle is not None:
            for cmd in left:  # samplers first: they belong to the model
                if isinstance(cmd, _FreeSampler):
                    cmd()
            if self._gate.wait_unused(UNLOAD_WAIT_S):
                if self._drafter is not None and self.drafter_state is not None:
                    try:
                        self._drafter.free(self.drafter_state)
                    except Exception:
                        log.exception("model %s: freeing the drafter failed", self._id)
                    self.drafter_state = None
                try:
                    self._backend.free(self._handle)
                except Exception:
                    log.exception("model %s: freeing the backend failed", self._id)
            else:
                # Freeing now would pull the model out from under a running native call.
                log.error(
                    "model %s: %d native call(s) still running after %.0f s; the model's "
                    "memory is left allocated rather than freed under them",
                    self._id,
                    self._gate.in_use,
                    UNLOAD_WAIT_S,
                )
            self._handle = None
            if self._adapters is not None:
                self._adapters.clear()
        gone = ModelNotFound(self._id)
        for cmd in left:
            if isinstance(cmd, Call) and cmd.start():
                self.post(cmd.resolve, None, gone)
            elif isinstance(cmd, _Restored):
                cmd.discard()
        self.post(self._loop.exited)
        self.flush()


class _Restored:
    """Command: a lookup's answer for ``req``."""

    def __init__(self, thread: ModelThread, req: Request, restore: Restore | None) -> None:
        self._thread, self._req, self._restore = thread, req, restore

    def __call__(self) -> None:
        self._thread.restored(self._req, self._restore)

    def discard(self) -> None:
        """Never run (the thread ended): the cache gets its row back."""
        if self._restore is not None:
            self._thread.release_later(self._restore)


class _FreeSampler:
    """Command: free the sampler of a request that never ran."""

    def __init__(self, thread: ModelThread, sampler: object) -> None:
        self._thread, self._sampler = thread, sampler

    def __call__(self) -> None:
        self._thread.free_sampler(self._sampler)


def _typed(exc: BaseException, backend: str, operation: str) -> BaseException:
    """``exc`` as an erllama error (a foreign one wrapped, its cause kept)."""
    if isinstance(exc, ErllamaError):
        return exc
    err = BackendError(backend, operation, f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
