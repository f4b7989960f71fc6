"""The event-loop side of one loaded model: lifecycle, intake, cancellation and delivery.

A :class:`ModelWorker` is thin: its native work happens on its
:class:`~erllama.model.thread.ModelThread`, reached only through the model's
:class:`~erllama.model.gate.ModelGate`; its helpers (text, adapters, operations) get the
gate and what they use, never the worker. Here live what must run on the loop: starting and
joining the thread inside the model's task group, checking requests and queueing them, each
request's cancel scope, cache lookups (file reads go to worker threads) and delivering what
the thread hands over (the worker is the thread's :class:`~erllama.model.sides.LoopSide`).

Invariants:

* The thread is started by :meth:`run` and joined before it returns, whatever happens:
  no thread outlives the model's task.
* Every request gets exactly one terminal event (``Done`` or an error), delivered here.
* The loop never waits for the model thread except where a caller asks for a native
  result (tokenize, embed ...), and then only that caller waits.
* An unload never frees the model under a native call in flight (see :mod:`.gate`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup, TaskStatus

from .._loop import LoopHandoff
from ..backends.types import LoadedModel
from ..cache.key import Namespace, quant_byte, salted
from ..cache.port import CachePort, NullCache, Restore
from ..cache.records import RecordStore
from ..cluster.prefixes import PrefixSummary
from ..config import CachePolicy, ModelConfig
from ..errors import ConfigError, InvalidRequest, ModelNotFound, NotSupported, UnloadTimeout
from ..events import (
    CachedPrefix,
    CacheExplanation,
    CacheHit,
    Done,
    FinishReason,
    ModelInfo,
    ModelStatus,
)
from ..fingerprint import file_sha256
from ..plugins import Backend
from ..speculative.control import DraftControl
from ..speculative.hookspecs import Drafter
from ..speculative.registry import DrafterPlugin
from ..stream import Failure, InferStream
from . import intake, routing
from .adapters import AdapterCalls
from .explain import Probe, Tails, explain, probe_prompt
from .gate import UNLOAD_WAIT_S, ModelGate
from .kv import COLD, KVTrack, Namespaces, SaveOrder
from .operations import Operations
from .output import Output, Signer
from .replay import Remembered, ReplayMemory, ReplyRecords
from .request import Request, RequestSpec
from .scheduler import Job, SchedulerClosed
from .snapshot import ModelFacts
from .speculation import draft_control
from .text import TextCalls
from .thread import ModelThread

__all__ = ["ModelWorker"]

#: Finished replies that may wait for their records to be written (see _keep_replies).
_UNWRITTEN = 64

log = logging.getLogger("erllama.model")


class ModelWorker:
    """Serves one model. Created and driven by :class:`~erllama.engine.Engine`."""

    def __init__(
        self,
        model_id: str,
        config: ModelConfig,
        backend: Backend,
        cache: CachePort,
        policy: CachePolicy,
        on_request_done: Callable[[Request], None],
        signer: Signer | None = None,
        reply_store: RecordStore | None = None,
        drafter: DrafterPlugin | None = None,
    ) -> None:
        self.id = model_id
        #: The drafter plugin of ``config.speculative`` (None: no speculative decoding).
        self._drafter = drafter
        self.config = config
        self.backend = backend
        self.cache = cache
        self.policy = config.policy or policy
        self._signer = signer
        self.replies = ReplayMemory()
        self._reply_store = reply_store
        #: Replies finished but not yet written to the records, and whether a writer runs.
        self._unwritten: deque[list[tuple[str, Remembered]]] = deque(maxlen=_UNWRITTEN)
        self._writing = False
        self.tails = Tails()
        #: Unsalted fingerprints this model has run under (adapter sets): a row under one
        #: of them explains a miss as ``adapter``.
        self.fingerprints: set[bytes] = set()
        self.gate = ModelGate(model_id, backend.name)
        self._thread = ModelThread(
            model_id, self.gate, self, backend, config, cache, self.policy, drafter
        )
        self.text = TextCalls(self.gate, backend, config, self.replies)
        self.adapters = AdapterCalls(self.gate, backend)
        self.ops = Operations(self.gate, self._store, config.session_ttl_s)
        self._on_request_done = on_request_done
        self._loaded: LoadedModel | None = None
        self._namespace: Callable[[bytes], Namespace] | None = None
        self._chains: routing.ChainMemo = {}
        self._tg: TaskGroup | None = None
        self._lookups: deque[Request] = deque()
        self._lookups_ready: anyio.Event | None = None
        self._loaded_event = anyio.Event()
        self._load_error: BaseException | None = None
        self._exited = anyio.Event()
        self._stopped = anyio.Event()
        self._refs = itertools.count(1)
        #: Requests submitted and not yet ended, by ref (event loop only).
        self._requests: dict[str, Request] = {}
        self._handoff: LoopHandoff | None = None
        self.loaded_at = time.monotonic()

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load, serve until closed (or failed), then end the thread. Load errors reach
        ``task_status``'s caller.

        The hand-off's pump lives exactly as long as this: started first, closed only after
        the thread has said it exited. The body's outcome is carried past the pump's task
        group so that errors (and cancellation) leave unwrapped."""
        handoff = self._handoff = LoopHandoff()
        outcome: BaseException | None = None
        async with anyio.create_task_group() as pump:
            try:
                await pump.start(handoff.pump)
                await self._run(handoff, task_status)
            except BaseException as exc:
                outcome = exc
            finally:
                handoff.close()
        if outcome is not None:
            raise outcome

    async def _run(self, handoff: LoopHandoff, task_status: TaskStatus[None]) -> None:
        self._thread.start(handoff)
        try:
            # A load cannot be abandoned halfway (the native model would leak): wait for it
            # shielded; a cancellation that arrived meanwhile is honoured right after.
            with anyio.CancelScope(shield=True):
                await self._loaded_event.wait()
            if self._load_error is not None:
                raise self._load_error
            loaded = self._loaded
            assert loaded is not None
            await anyio.lowlevel.checkpoint()
            fingerprint = await self._fingerprint(loaded)
            self._namespace = Namespaces(quant_byte(self.quant_label()), loaded.kv_layout)
            n_seq = min(self.config.n_seq_max, loaded.n_seq_max)
            namespace = self._namespace
            await self.gate.call(lambda t: t.begin(fingerprint, namespace, n_seq), starting=True)
            self._start_replay(fingerprint)
            self.gate.status = "idle"
            self.loaded_at = time.monotonic()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.cache.enabled:
                    tg.start_soon(self._dispatch_lookups, tg)
                tg.start_soon(self.ops.expire_sessions)
                task_status.started()
                await self._exited.wait()
                # Requests ended from here on (the unload cancels them) start no new task.
                self._tg = None
                tg.cancel_scope.cancel()  # lookups still in flight
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                self._cancel_everything()
                self._thread.stop()
                await self._exited.wait()
                await anyio.to_thread.run_sync(self._thread.join)
            self._stopped.set()

    async def _keep_replies(self, backing: ReplyRecords) -> None:
        """Write the finished replies' records, one worker thread at a time, whatever the
        request rate: a thread per reply, each fsyncing, took every worker thread anyio
        lends and starved the model's text calls (tokenize, templates, adapters) that
        borrow them too. Past ``_UNWRITTEN`` replies waiting, the oldest are not written (a
        record only saves a later prefill); an unload drops what is still waiting."""
        try:
            while self._unwritten:
                batch = [item for learned in self._unwritten for item in learned]
                self._unwritten.clear()
                await anyio.to_thread.run_sync(backing.put, batch)
        finally:
            self._writing = False

    def _start_replay(self, fingerprint: bytes) -> None:
        """Exact replay knows the model's thinking markers (a client drops those spans)
        and, with file tiers, keeps its replies beside the rows under the fingerprint."""
        facts = self.gate.facts
        if facts is not None:
            self.replies.thinking = _pair(facts.markers.think_start, facts.markers.think_end)
        if self._reply_store is not None:
            self.replies.backing = ReplyRecords(self._reply_store, fingerprint)

    async def close(self, *, wait_s: float = UNLOAD_WAIT_S, force: bool = False) -> None:
        """Stop serving: refuse new calls, wait (up to ``wait_s``) for native calls in flight
        (UnloadTimeout, the model still serving, if they do not end; with ``force`` it goes
        on regardless), then cancel everything queued and running (running requests are
        saved first), free the model, and return once its thread has ended."""
        if not await self.gate.begin_unload(wait_s) and not force:
            raise UnloadTimeout(self.id, wait_s, self.gate.in_use)
        if self.gate.status != "failed":
            self.gate.status = "unloading"
        self._cancel_everything()
        self._thread.stop()
        await self._stopped.wait()

    async def _fingerprint(self, loaded: LoadedModel) -> bytes:
        """The model's cache identity: the config's override, else what the backend
        reports, else the SHA-256 of the model file."""
        if self.config.fingerprint is not None:
            return bytes.fromhex(self.config.fingerprint)
        if loaded.fingerprint is not None:
            return bytes.fromhex(loaded.fingerprint)
        path = self.config.model_path
        if path is None:
            # Neither a file nor an identity of its own: never the all-zero namespace.
            seed = f"{self.backend.name}:{sorted(self.config.options.items())!r}"
            return hashlib.sha256(seed.encode()).digest()
        try:
            mode = (await anyio.Path(path).stat()).st_mode
        except OSError as exc:
            raise ConfigError(
                [("model_path", f"cannot fingerprint {path}: {exc.strerror}")]
            ) from exc
        if not stat.S_ISREG(mode):
            raise ConfigError(
                [
                    (
                        "fingerprint",
                        f"model_path {path} is not a regular file, and backend "
                        f"{self.backend.name!r} reported no fingerprint: set "
                        "ModelConfig.fingerprint (the cache must know the model's identity)",
                    )
                ]
            )
        # Hashing a multi-GB file is I/O-bound; keep it off the loop and off the model thread.
        return bytes.fromhex(await anyio.to_thread.run_sync(file_sha256, path))

    # ---- LoopSide: what the thread hands over (run on the loop) ------------------------------

    def loaded(self, loaded: LoadedModel | None, error: BaseException | None) -> None:
        self._loaded, self._load_error = loaded, error
        self._loaded_event.set()

    def exited(self) -> None:
        self._exited.set()

    def model_failed(self, error: BaseException) -> None:
        self.gate.error = error
        self.gate.status = "failed"

    def lookup(self, req: Request) -> None:
        # A plain loop callback cannot start tasks (anyio needs a task context): the
        # dispatcher task does.
        self._lookups.append(req)
        if self._lookups_ready is not None:
            self._lookups_ready.set()

    def save(self, req: Request | None, order: SaveOrder) -> None:
        self._store(req, order)

    def finished(self, req: Request, reason: FinishReason, order: SaveOrder | None) -> None:
        """A request ended normally: its finish save first (so the key in ``Done`` is
        already reserved), then ``Done``."""
        if order is not None:
            key = self._store(req, order)
            if key is not None:
                req.saves.finish_key = key.hex()
        if req.reply_text:
            learned = self.replies.remember(req.reply_text, req.generated, req.output.stop_sequence)
            backing = self.replies.backing
            if learned and backing is not None and self._tg is not None:
                self._unwritten.append(learned)
                if not self._writing:
                    self._writing = True
                    self._tg.start_soon(self._keep_replies, backing)
        kv = req.kv
        if 0 < kv.kept < len(kv.context) and self._namespace is not None:
            # What the exactness rule dropped: a next prompt that goes on with it is a
            # "grid" miss, not a divergence (model/explain.py).
            ns = self._namespace(kv.fingerprint)
            self.tails.remember(ns.key(kv.context[: kv.kept]), kv.context[kv.kept :])
        stats = req.clock.stats(
            req.spec, req.kv, req.saves, reason, req.generated, req.output.stop_sequence
        )
        draft = req.job.draft
        if isinstance(draft, DraftControl):
            stats = attrs.evolve(stats, draft_tokens=draft.drafted, draft_accepted=draft.accepted)
        req.channel.push(
            Done(
                finish_reason=reason,
                stats=stats,
                token_ids=tuple(req.generated),
                context=tuple(req.kv.context),
                reply_text=req.reply_text,
            )
        )
        self._ended(req)

    def failed(self, req: Request, error: BaseException) -> None:
        req.channel.push(Failure(error))
        self._ended(req)

    def _store(self, req: Request | None, order: SaveOrder) -> bytes | None:
        """Give a packed state to the cache; on success, count what it adds to ``req``."""
        if order.payload is None:
            key = order.key if self.cache.holds(order.key) else None
        else:
            key = self.cache.save(order.ns, order.tokens, order.payload, order.reason)
        if key is not None and req is not None:
            saves = req.saves
            saves.created = max(saves.created, len(order.tokens) - req.kv.hit.prefix_len)
        return key

    def _ended(self, req: Request) -> None:
        self._requests.pop(req.ref, None)
        req.channel.close()
        req.finished.set()
        self._on_request_done(req)

    async def _dispatch_lookups(self, tg: TaskGroup) -> None:
        previous = anyio.Event()
        previous.set()
        while True:
            while not self._lookups:
                self._lookups_ready = anyio.Event()
                await self._lookups_ready.wait()
            self._lookups_ready = None
            while self._lookups:
                delivered = anyio.Event()
                tg.start_soon(self._lookup, self._lookups.popleft(), previous, delivered)
                previous = delivered

    async def _lookup(self, req: Request, previous: anyio.Event, delivered: anyio.Event) -> None:
        """Find and read the best cache row while the thread keeps stepping others. Lookups
        run concurrently (file reads overlap) but are handed to the thread in admission
        order (``previous`` is the one before's hand-over), so requests start feeding in
        the FIFO order they were admitted in, however long each read took."""
        try:
            restore = await self._find(req)
            await previous.wait()
            self._thread.restore(req, restore)
        finally:
            delivered.set()

    async def _find(self, req: Request) -> Restore | None:
        assert self._namespace is not None
        try:
            restore = await self.cache.lookup(
                self._namespace(req.kv.fingerprint),
                req.spec.prompt,
                req.kv.parent_key,
                self.policy,
                longer_than=req.kv.live_len,
            )
        except Exception:
            log.exception("model %s: cache lookup failed; serving cold", self.id)
            restore = None
        try:
            req.probe = self._probe(req.kv.fingerprint, req.spec.prompt, req.spec.cache_salt)
        except Exception:
            log.exception("model %s: explaining the lookup failed", self.id)
        return restore

    def _probe(self, fingerprint: bytes, prompt: Sequence[int], salt: str | None) -> Probe:
        """What the model holds near ``prompt`` (model/explain.py). Other namespaces are
        searched only for an unsalted request: a salt's requests never learn what other
        salts' requests left."""
        assert self._namespace is not None
        facts = self.gate.facts
        if salt is None:
            self.fingerprints.add(fingerprint)
        known = set(self.fingerprints)
        if facts is not None:
            known.add(facts.fingerprint)
        return probe_prompt(
            self.cache,
            self._namespace(fingerprint),
            prompt,
            self.gate.view.live,
            self.tails,
            foreign=salt is None,
            known_fingerprints=known,
        )

    # ---- views (never wait on the thread) -------------------------------------------------------

    @property
    def state(self) -> ModelStatus:
        """The model's lifecycle state: loading, idle, unloading or failed."""
        return self.gate.status

    @property
    def closing(self) -> bool:
        """Being unloaded: refusing new calls, or past that (``state`` says ``unloading``
        only once the calls in flight have ended)."""
        return self.gate.status == "unloading" or self.gate.unloading

    @property
    def status(self) -> ModelStatus:
        """The lifecycle state, or while serving the scheduler's phase."""
        sched = self.gate.scheduler
        if self.gate.status != "idle" or sched is None:
            return self.gate.status
        return sched.statistics().phase

    @property
    def load(self) -> int:
        """Requests queued or admitted."""
        sched = self.gate.scheduler
        if sched is None:
            return 0
        stats = sched.statistics()
        return stats.waiting + stats.running

    @property
    def idle(self) -> bool:
        """Nothing admitted, queued or being changed, and no call in flight that uses the
        native handle or is on its way to the queue: safe to unload under pressure."""
        sched = self.gate.scheduler
        if sched is None or self.gate.status != "idle" or self.gate.in_use:
            return False
        return not sched.statistics().busy

    @property
    def last_used(self) -> float:
        return self.gate.view.last_used

    def info(self) -> ModelInfo:
        facts: ModelFacts | None = self.gate.facts
        loaded = facts.loaded if facts is not None else self._loaded
        sched = self.gate.scheduler
        stats = sched.statistics() if sched is not None else None
        view = self.gate.view
        markers = facts.markers if facts is not None else None
        fingerprint = facts.fingerprint if facts is not None else b""
        return ModelInfo(
            id=self.id,
            backend=self.backend.name,
            status=self.status,
            model_path=str(self.config.model_path) if self.config.model_path else None,
            capabilities=self.backend.capabilities,
            n_ctx=loaded.n_ctx if loaded else 0,
            n_seq_max=stats.n_seq if stats is not None else self.config.n_seq_max,
            n_vocab=loaded.n_vocab if loaded else 0,
            queue_len=stats.waiting if stats is not None else 0,
            running=stats.running if stats is not None else 0,
            fingerprint=fingerprint.hex(),
            effective_fingerprint=(view.fingerprint or fingerprint).hex(),
            quant=self.quant_label(),
            last_cache_hit=view.last_hit,
            loaded_at=self.loaded_at,
            last_used=view.last_used or self.loaded_at,
            adapters=view.adapters,
            sessions=view.sessions,
            thinking_markers=_pair(markers.think_start, markers.think_end) if markers else None,
            tool_call_markers=_pair(markers.tool_start, markers.tool_end) if markers else None,
            error=str(self.gate.error) if self.gate.error is not None else None,
            metadata=dict(loaded.metadata) if loaded else {},
            pending_changes=stats.barriers if stats is not None else 0,
        )

    def quant_label(self) -> str:
        if self.config.quant is not None:
            return self.config.quant
        return self._loaded.quant if self._loaded else "unknown"

    # ---- routing queries (pure, over the cache and the thread's snapshot) ------------------------

    def n_vocab(self) -> int:
        facts = self.gate.facts
        assert facts is not None
        return facts.loaded.n_vocab

    def cached_prefix(self, tokens: Sequence[int], cache_salt: str | None = None) -> CachedPrefix:
        assert self._namespace is not None
        return routing.cached_prefix(
            self.cache, self._namespace, self.policy, self.gate.view, tokens, cache_salt
        )

    async def explain_prefix(
        self, tokens: Sequence[int], cache_salt: str | None = None
    ) -> CacheExplanation:
        """What a request for ``tokens`` would restore now, and why no more (see
        :mod:`.explain`). Loads nothing and counts no hit; decoding the excerpts is a
        counted native call."""
        assert self._namespace is not None
        facts = self.gate.facts
        assert facts is not None
        view = self.gate.view
        fp = salted(view.fingerprint, cache_salt)
        grid = facts.loaded.reuse_grid(self.config.effective_prefill_chunk)
        n = len(tokens)
        hit = COLD
        probe = None
        if self.cache.enabled:
            # As admission decides: the live KV first, a row only when it holds more.
            live = routing.cached_prefix(
                NullCache(), self._namespace, self.policy, view, tokens, cache_salt
            )
            found = self.cached_prefix(tokens, cache_salt)
            # Live cells shorter than min_tokens are not reused (SequenceKV.choose).
            if live.tokens >= min(self.policy.min_tokens, n) and live.tokens >= found.tokens:
                found = live
            start = min(found.tokens, n - 1) // grid * grid
            if start:
                hit = CacheHit(
                    kind="exact" if found.tokens == n else "partial",
                    prefix_len=start,
                    source="live" if found.tier == "live" else "prefix",
                    tier=None if found.tier == "live" else found.tier,
                )
            probe = self._probe(fp, tokens, cache_salt)
        # Twice: once to learn which excerpts it shows, then with their text (decoding is
        # a native call, awaited here; the model thread decodes through its piece cache).
        wanted: list[tuple[int, ...]] = []

        def note(ids: Sequence[int]) -> str:
            wanted.append(tuple(ids))
            return ""

        explain(probe, hit, tokens, grid, note)
        texts = {ids: await self.text.detokenize(ids) if ids else "" for ids in wanted}
        return explain(probe, hit, tokens, grid, lambda ids: texts[tuple(ids)])

    def cached_prefixes(self) -> list[CachedPrefix]:
        if self._namespace is None:
            return []
        return routing.cached_prefixes(self.cache, self._namespace, self.gate.view)

    def prefix_summary(self, block: int, limit: int) -> PrefixSummary:
        if self._namespace is None:
            return PrefixSummary(block=block, limit=limit)
        summary, self._chains = routing.prefix_summary(
            self.cache, self._namespace, self.gate.view, block, limit, self._chains
        )
        return summary

    # ---- requests -----------------------------------------------------------------------------

    async def infer(
        self,
        prompt: str | Sequence[int],
        args: intake.RequestArgs,
        *,
        cancel: Callable[[str], None],
        prefill_only: bool = False,
        drafter: Drafter | None = None,
    ) -> tuple[Request, InferStream]:
        # Counted from here to the queue: an unload (or the pressure scheduler) waits for
        # an intake in flight, and one that arrives after an unload began is refused.
        async with self.gate.using():
            facts = self.gate.facts
            assert facts is not None
            loaded = facts.loaded
            seed = args.seed
            if seed is None:
                seed = self.config.seed if self.config.seed is not None else secrets.randbits(32)
            sp = args.sampler_with(seed)
            intake.prompt_kind(prompt)
            intake.check_bias_ids(sp.logit_bias, loaded.n_vocab)
            if args.logprobs is not None and "logprobs" not in loaded.features:
                raise NotSupported(self.backend.name, "logprobs")
            needs_sampler = not sp.is_greedy_default
            if needs_sampler and not self.backend.supports("sampler"):
                raise NotSupported(self.backend.name, "grammar" if sp.grammar else "sampler")
            self._check_queue_room()
            tokens: list[int] | None = None
            if not isinstance(prompt, str):
                intake.check_prompt_length(len(prompt), loaded.n_ctx)
                tokens = intake.check_token_ids(prompt, loaded.n_vocab, "prompt")
            sampler: Any = None
            if tokens is None or needs_sampler:
                text = prompt if isinstance(prompt, str) else None
                prepared = await self.text.prepare(
                    text, args.add_special, sp if needs_sampler else None, held=True
                )
                sampler = prepared[1]
                if tokens is None:
                    tokens = prepared[0]
                    assert tokens is not None
                    try:
                        intake.check_prompt_length(len(tokens), loaded.n_ctx)
                    except InvalidRequest:
                        self._thread.free_sampler_later(sampler)
                        raise
            draft = draft_control(
                self.config,
                self._drafter,
                loaded,
                args,
                prefill_only=prefill_only,
                drafter=drafter,
                cost=self._thread.pass_cost,
                state=self._thread.drafter_state,
            )
            spec = RequestSpec(
                prompt=tuple(tokens),
                params=sp,
                max_tokens=0 if prefill_only else args.max_tokens,
                parent_key=args.parent_key,
                stop=args.stop,
                thinking=args.thinking,
                thinking_budget=args.thinking_budget_tokens,
                session=args.session_id,
                logprobs=args.logprobs,
                cache_salt=args.cache_salt,
            )
            return self._submit(facts, spec, sampler, cancel, draft)

    def _submit(
        self,
        facts: ModelFacts,
        spec: RequestSpec,
        sampler: object,
        cancel: Callable[[str], None],
        draft: DraftControl | None = None,
    ) -> tuple[Request, InferStream]:
        sched = self.gate.scheduler
        assert sched is not None
        ref = f"{self.id}#{next(self._refs)}"
        markers = facts.markers
        # A template that opens the thinking span itself (the prompt ends with its start
        # marker): the model's first tokens are thinking.
        starts_thinking = (
            spec.thinking
            and markers.thinking
            and spec.prompt[-len(markers.think_start_tokens) :] == markers.think_start_tokens
        )
        req = Request(
            ref=ref,
            spec=spec,
            job=None,  # type: ignore[arg-type]  # set just below: the job owns the request
            kv=KVTrack(prompt=spec.prompt, parent_key=spec.parent_key),
            output=Output(
                facts.pieces,
                stops=spec.stop,
                markers=markers,
                thinking=spec.thinking,
                thinking_budget=spec.thinking_budget,
                signer=self._signer,
                start="think" if starts_thinking else "text",
            ),
        )
        req.job = Job(
            req,
            max_tokens=spec.max_tokens,
            session=spec.session,
            sampler=sampler,
            logprobs=spec.logprobs,
            draft=draft,
        )
        if draft is not None:
            kv = req.kv
            draft.context = lambda: kv.context
            if spec.params.temperature > 0:
                # A request that draws chooses its tool calls' syntax greedily: a draft
                # must not run across where that starts or ends (Output.steady).
                draft.steady = req.output.steady
        try:
            # Held: an unload that began during this intake waited for it, and then cancels
            # the request like any other in flight.
            self.gate.check_serving(held=True)
            sched.add_request(req.job)
        except SchedulerClosed:
            self._thread.free_sampler_later(sampler)
            raise ModelNotFound(self.id) from None
        except BaseException:
            self._thread.free_sampler_later(sampler)
            raise
        assert self._tg is not None and self._handoff is not None
        self._requests[ref] = req
        self._tg.start_soon(self._request_task, req)
        self.gate.wake.set()
        handoff = self._handoff
        stream = InferStream(
            ref,
            self.id,
            req.channel,
            functools.partial(cancel, ref),
            # A dropped stream's finalizer may run on any thread: through the hand-off.
            lambda: _ignore(handoff.post(cancel, ref)),
        )
        return req, stream

    async def draft_tokens(self, context: Sequence[int], n: int) -> list[int]:
        """Up to ``n`` tokens the model's drafter proposes to follow ``context``."""
        spec = self.config.speculative
        if spec is None or self._drafter is None:
            raise InvalidRequest(
                "model", "was loaded without speculative decoding (ModelConfig.speculative)"
            )
        facts = self.gate.facts
        assert facts is not None
        ids = intake.check_token_ids(context, facts.loaded.n_vocab, "context")
        if not ids:
            raise InvalidRequest("context", "is empty")
        intake.check_draft_len(n, "n")
        if self._thread.drafter_state is not None:
            # A drafter with per-model state (a draft model) runs on the model's thread only.
            raise NotSupported(self.backend.name, f"draft_tokens with drafter {spec.drafter!r}")
        drafter = self._drafter.new(spec)
        # Off the loop: a first draft indexes the whole context.
        out = await anyio.to_thread.run_sync(drafter.draft, ids[:-1], ids[-1], n)
        return [int(t) for t in out][:n]

    def _check_queue_room(self) -> None:
        sched = self.gate.scheduler
        assert sched is not None
        sched.check_room()

    async def _request_task(self, req: Request) -> None:
        """Holds the request's cancel scope: cancelling it cancels the request."""
        with req.scope:
            await req.finished.wait()
        if not req.finished.is_set():
            self.cancel(req)
            # The thread finishes it between steps (a finish save may run first).
            with anyio.CancelScope(shield=True):
                await req.finished.wait()

    def cancel(self, req: Request) -> None:
        """Idempotent. A queued request ends at once; a running one before its next token."""
        sched = self.gate.scheduler
        if sched is not None and sched.abort(req.job):
            # Ended here, before the thread ever saw it: its sampler is ours to free.
            self._thread.free_sampler_later(req.job.sampler)
            self.finished(req, "cancelled", None)
        else:
            self.gate.wake.set()

    def _cancel_everything(self) -> None:
        for req in list(self._requests.values()):
            self.cancel(req)


def _ignore(_: object) -> None:
    pass


def _pair(start: bytes, end: bytes) -> tuple[str, str] | None:
    return (start.decode("utf-8"), end.decode("utf-8")) if start and end else None
