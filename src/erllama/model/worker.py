"""The event-loop side of one loaded model: lifecycle, intake, cancellation and delivery.

A :class:`ModelWorker` is thin: its native work happens on its :class:`ModelThread`, its
scheduling in a :class:`~erllama.model.scheduler.Scheduler` shared with that thread under
``lock``. Here live what must run on the loop: starting and joining the thread inside the
model's task group, checking requests and queueing them, each request's cancel scope,
cache lookups (file reads go to worker threads) and delivering what the thread hands over.

Invariants:

* The thread is started by :meth:`run` and joined before it returns, whatever happens:
  no thread outlives the model's task.
* Every request gets exactly one terminal event (``Done`` or an error), delivered here.
* The loop never waits for the model thread except where a caller asks for a native
  result (tokenize, embed ...), and then only that caller waits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from .._loop import LoopHandoff
from ..backends.types import LoadedModel
from ..cache.key import (
    Namespace,
    kv_layout_hash,
    quant_byte,
)
from ..cache.port import CachePort
from ..config import CachePolicy, ModelConfig
from ..errors import ConfigError, InvalidRequest, ModelFailed, ModelNotFound, NotSupported
from ..events import (
    CacheHit,
    Done,
    FinishReason,
    ModelInfo,
    ModelStatus,
)
from ..fingerprint import file_sha256
from ..plugins import Backend
from ..sampling import SamplerParams, validate_max_tokens
from ..stream import Failure, InferStream
from . import intake
from .adapters import AdapterCalls
from .calls import Call
from .kv import KVTrack, SaveOrder
from .operations import Operations
from .output import Output, Signer
from .replay import ReplayMemory
from .request import Request, RequestSpec
from .scheduler import Barrier, Job
from .status import StatusView
from .stops import check_stops
from .text import TextCalls
from .thread import ModelThread

__all__ = ["ModelWorker"]

log = logging.getLogger("erllama.model")
T = TypeVar("T")


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
    ) -> None:
        self.id = model_id
        self.config = config
        self.backend = backend
        self.cache = cache
        self.policy = config.policy or policy
        self.signer = signer
        self.replies = ReplayMemory()
        self.view = StatusView(self)
        self.text = TextCalls(self)
        self.ops = Operations(self)
        self.adapters = AdapterCalls(self)
        self._on_request_done = on_request_done
        #: Guards the scheduler (and call states) between the loop and the model thread.
        self.lock = threading.Lock()
        self.handoff: LoopHandoff
        self.thread = ModelThread(self)
        self.loaded: LoadedModel | None = None
        self.fingerprint = b""
        self._namespaces: dict[bytes, Namespace] = {}
        self._tg: TaskGroup | None = None
        self._lookups: deque[Request] = deque()
        self._lookups_ready: anyio.Event | None = None
        self._loaded_event = anyio.Event()
        self._load_error: BaseException | None = None
        self._exited = anyio.Event()
        self.stopped = anyio.Event()
        self._closing = False
        self.state: ModelStatus = "loading"
        self.error: BaseException | None = None
        self._refs = itertools.count(1)
        self.last_hit: CacheHit | None = None
        self.loaded_at = time.monotonic()
        self.last_used = self.loaded_at

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load, serve until closed (or failed), then end the thread. Load errors reach
        ``task_status``'s caller.

        The hand-off's pump lives exactly as long as this: started first, closed only after
        the thread has said it exited. The body's outcome is carried past the pump's task
        group so that errors (and cancellation) leave unwrapped."""
        self.handoff = LoopHandoff()
        outcome: BaseException | None = None
        async with anyio.create_task_group() as pump:
            try:
                await pump.start(self.handoff.pump)
                await self._run(task_status)
            except BaseException as exc:
                outcome = exc
            finally:
                self.handoff.close()
        if outcome is not None:
            raise outcome

    async def _run(self, task_status: TaskStatus[None]) -> None:
        self.thread.start()
        try:
            # A load cannot be abandoned halfway (the native model would leak): wait for it
            # shielded; a cancellation that arrived meanwhile is honoured right after.
            with anyio.CancelScope(shield=True):
                await self._loaded_event.wait()
            if self._load_error is not None:
                raise self._load_error
            loaded = self.loaded
            assert loaded is not None
            await anyio.lowlevel.checkpoint()
            self.fingerprint = await self._fingerprint(loaded)
            n_seq = min(self.config.n_seq_max, loaded.n_seq_max)
            self.thread.begin(self.fingerprint, n_seq)
            self.state = "idle"
            self.loaded_at = self.last_used = time.monotonic()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.cache.enabled:
                    tg.start_soon(self._dispatch_lookups, tg)
                tg.start_soon(self.ops.expire_sessions)
                task_status.started()
                await self._exited.wait()
                tg.cancel_scope.cancel()  # lookups still in flight
        finally:
            with anyio.CancelScope(shield=True):
                self._cancel_everything()
                self.thread.stop()
                await self._exited.wait()
                await anyio.to_thread.run_sync(self.thread.thread.join)
            self.stopped.set()

    async def close(self) -> None:
        """Cancel everything queued and running (running requests are saved first), free
        the model, and return once its thread has ended."""
        self._closing = True
        if self.state != "failed":
            self.state = "unloading"
        self._cancel_everything()
        self.thread.stop()
        await self.stopped.wait()

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

    def check_serving(self) -> None:
        if self.state == "failed":
            err = self.error
            detail = str(err) if err is not None else ""
            raise ModelFailed(self.id, self.backend.name, "serving", detail) from err
        if self._closing or self.thread.sched is None:
            raise ModelNotFound(self.id)

    # ---- what the thread hands over (run on the loop) ------------------------------------

    def on_loaded(self, loaded: LoadedModel | None, error: BaseException | None) -> None:
        self.loaded, self._load_error = loaded, error
        self._loaded_event.set()

    def thread_exited(self) -> None:
        self._exited.set()

    def model_failed(self, error: BaseException) -> None:
        self.state = "failed"
        self.error = error

    def lookup(self, req: Request) -> None:
        # A plain loop callback cannot start tasks (anyio needs a task context): the
        # dispatcher task does.
        self._lookups.append(req)
        if self._lookups_ready is not None:
            self._lookups_ready.set()

    async def _dispatch_lookups(self, tg: TaskGroup) -> None:
        while True:
            while not self._lookups:
                self._lookups_ready = anyio.Event()
                await self._lookups_ready.wait()
            self._lookups_ready = None
            while self._lookups:
                tg.start_soon(self._lookup, self._lookups.popleft())

    async def _lookup(self, req: Request) -> None:
        """Find and read the best cache row while the thread keeps stepping others."""
        try:
            restore = await self.cache.lookup(
                self.namespace(req.kv.fingerprint),
                req.spec.prompt,
                req.kv.parent_key,
                self.policy,
                longer_than=req.kv.live_len,
            )
        except Exception:
            log.exception("model %s: cache lookup failed; serving cold", self.id)
            restore = None
        try:
            self.thread.send(functools.partial(self.thread.restored, req, restore))
        except ModelNotFound:
            if restore is not None:
                self.cache.release(restore)

    def save(self, req: Request, order: SaveOrder) -> bytes | None:
        key = self.accept(order)
        if key is not None:
            kv = req.kv
            kv.created = max(kv.created, len(order.tokens) - kv.hit.prefix_len)
        return key

    def accept(self, order: SaveOrder) -> bytes | None:
        if order.payload is None:
            return order.key if self.cache.holds(order.key) else None
        return self.cache.save(order.ns, order.tokens, order.payload, order.reason)

    def finished(self, req: Request, reason: FinishReason, order: SaveOrder | None) -> None:
        """A request ended normally: its finish save first (so the key in ``Done`` is
        already reserved), then ``Done``."""
        if order is not None:
            key = self.save(req, order)
            if key is not None:
                req.kv.finish_key = key.hex()
        if req.reply_text:
            self.replies.remember(req.reply_text, req.generated)
        stats = req.clock.stats(req.spec, req.kv, reason, req.generated, req.output.stop_sequence)
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

    def save_order(self, order: SaveOrder) -> None:
        """A save that belongs to no request (a released session's sequence)."""
        self.accept(order)

    def failed(self, req: Request, error: BaseException) -> None:
        req.channel.push(Failure(error))
        self._ended(req)

    def _ended(self, req: Request) -> None:
        req.channel.close()
        req.finished.set()
        self._on_request_done(req)

    # ---- views (never wait on the thread) -------------------------------------------------------

    @property
    def status(self) -> ModelStatus:
        return self.view.status

    @property
    def queue_len(self) -> int:
        return self.view.queue_len

    @property
    def load(self) -> int:
        return self.view.load

    @property
    def idle(self) -> bool:
        return self.view.idle

    def info(self) -> ModelInfo:
        return self.view.info()

    def quant_label(self) -> str:
        if self.config.quant is not None:
            return self.config.quant
        return self.loaded.quant if self.loaded else "unknown"

    def namespace(self, fingerprint: bytes) -> Namespace:
        """The cache namespace for ``fingerprint`` (called from both sides: a race only
        computes the same value twice)."""
        ns = self._namespaces.get(fingerprint)
        if ns is None:
            assert self.loaded is not None
            ns = Namespace(
                fingerprint, quant_byte(self.quant_label()), kv_layout_hash(self.loaded.kv_layout)
            )
            self._namespaces[fingerprint] = ns
        return ns

    # ---- calls into the thread ----------------------------------------------------------------

    async def call(
        self,
        fn: Callable[[], Any],
        *,
        exclusive: bool = False,
        finish: Callable[[Any], T] | None = None,
    ) -> T:
        """Run ``fn`` on the model thread between steps. ``exclusive`` calls queue FIFO
        with requests and run while none is admitted (adapter changes). A caller cancelled
        before its call started withdraws it; one that started completes (``finish`` runs
        on the loop with its result either way)."""
        self.check_serving()
        c: Call[T] = Call(fn, self.lock, finish)
        sched = self.thread.sched
        if exclusive:
            assert sched is not None
            barrier = Barrier(owner=c)
            with self.lock:
                if self.thread.closed:
                    raise ModelNotFound(self.id)
                sched.submit_barrier(barrier)
            self.thread.wake.set()
            try:
                return await c.wait()
            except BaseException:
                if c.state == "withdrawn":
                    with self.lock:
                        sched.withdraw_barrier(barrier)
                raise
        self.thread.send(c)
        return await c.wait()

    # ---- requests -----------------------------------------------------------------------------

    async def infer(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: Any,
        params: Mapping[str, Any],
        parent_key: str | bytes | None,
        add_special: bool,
        cancel: Callable[[str], None],
        stop: Any = None,
        thinking: Any = False,
        thinking_budget_tokens: Any = None,
        session_id: Any = None,
        cache_salt: Any = None,
        prefill_only: bool = False,
    ) -> tuple[Request, InferStream]:
        self.check_serving()
        loaded = self.loaded
        sched = self.thread.sched
        assert loaded is not None and sched is not None
        if params.get("seed") is None:
            seed = self.config.seed if self.config.seed is not None else secrets.randbits(32)
            params = {**params, "seed": seed}
        sp = SamplerParams.build(**params)
        limit = 0 if prefill_only else validate_max_tokens(max_tokens)
        parent = intake.parse_parent_key(parent_key)
        stops = check_stops(stop)
        intake.check_flag(thinking, "thinking")
        intake.check_flag(add_special, "add_special")
        budget = intake.check_budget(thinking_budget_tokens)
        session = intake.check_session(session_id)
        salt = intake.check_cache_salt(cache_salt)
        intake.prompt_kind(prompt)
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
            prepared: tuple[list[int] | None, Any] = await self.vocab_call(
                functools.partial(self.prepare, text, add_special, sp if needs_sampler else None)
            )
            sampler = prepared[1]
            if tokens is None:
                tokens = prepared[0]
                assert tokens is not None
                try:
                    intake.check_prompt_length(len(tokens), loaded.n_ctx)
                except InvalidRequest:
                    if sampler is not None:
                        self._free_sampler_later(sampler)
                    raise
        spec = RequestSpec(
            prompt=tuple(tokens),
            params=sp,
            max_tokens=limit,
            parent_key=parent,
            stop=stops,
            thinking=thinking,
            thinking_budget=budget,
            session=session,
            cache_salt=salt,
        )
        return self._submit(spec, sampler, cancel)

    async def vocab_call(self, fn: Callable[[], T]) -> T:
        """Run a vocabulary-only hook (tokenize, detokenize, chat template, sampler_new) on a
        worker thread. They read nothing a step writes (llama.cpp's server tokenizes on its
        HTTP threads the same way), so they never wait for, nor stall, the model thread."""
        return await anyio.to_thread.run_sync(fn)

    def prepare(
        self, text: str | None, add_special: bool, sp: SamplerParams | None
    ) -> tuple[list[int] | None, Any]:
        """Tokenize the prompt and build its sampler (a worker thread)."""
        handle = self.thread.handle
        tokens = None
        if text is not None:
            intake.check_text(text, "prompt")
            tokens = self.backend.tokenize(handle, text, add_special=add_special)
        sampler = self.backend.sampler_new(handle, sp) if sp is not None else None
        return tokens, sampler

    def _submit(
        self, spec: RequestSpec, sampler: Any, cancel: Callable[[str], None]
    ) -> tuple[Request, InferStream]:
        sched = self.thread.sched
        assert sched is not None and self.thread.pieces is not None
        ref = f"{self.id}#{next(self._refs)}"
        job = Job(max_tokens=spec.max_tokens, session=spec.session)
        markers = self.thread.markers
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
            job=job,
            kv=KVTrack(prompt=spec.prompt, parent_key=spec.parent_key),
            output=Output(
                self.thread.pieces,
                stops=spec.stop,
                markers=markers,
                thinking=spec.thinking,
                thinking_budget=spec.thinking_budget,
                signer=self.signer,
                start="think" if starts_thinking else "text",
            ),
            sampler=sampler,
        )
        job.owner = req
        try:
            self.check_serving()
            with self.lock:
                if self.thread.closed:
                    raise ModelNotFound(self.id)
                sched.submit(job)
        except BaseException:
            if sampler is not None:
                self._free_sampler_later(sampler)
            raise
        assert self._tg is not None
        self._tg.start_soon(self._request_task, req)
        self.thread.wake.set()
        handoff = self.handoff
        stream = InferStream(
            ref,
            self.id,
            req.channel,
            functools.partial(cancel, ref),
            lambda: _ignore(handoff.post(cancel, ref)),
        )
        return req, stream

    def _check_queue_room(self) -> None:
        sched = self.thread.sched
        assert sched is not None
        with self.lock:
            sched.check_room()

    def _free_sampler_later(self, sampler: Any) -> None:
        with contextlib.suppress(ModelNotFound):  # the model is gone, its samplers with it
            self.thread.send(functools.partial(self.thread.free_sampler, sampler))

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
        with self.lock:
            ended_now = self.thread.sched is not None and self.thread.sched.cancel(req.job)
            if ended_now:
                self.thread.sched.take_ended()  # type: ignore[union-attr]
        if ended_now:
            if req.sampler is not None:
                sampler, req.sampler = req.sampler, None
                self._free_sampler_later(sampler)
            self.finished(req, "cancelled", None)
        else:
            self.thread.wake.set()

    def _cancel_everything(self) -> None:
        sched = self.thread.sched
        if sched is None:
            return
        with self.lock:
            reqs = [j.owner for j in (*sched.queue, *sched.admitted.values()) if isinstance(j, Job)]
        for req in reqs:
            self.cancel(req)


def _ignore(_: object) -> None:
    pass
