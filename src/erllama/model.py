"""The per-model worker: FIFO queue, admission, the tick loop, cancel, and save triggers.

One :class:`ModelWorker` serves one loaded model. Its ``run`` task owns a task group holding
the tick loop and one small task per request (the request's cancel scope lives there).

Invariants:

* Every native call (load, step, pack, unpack, tokenize ...) runs through ``_native``: on a
  worker thread under this model's ``CapacityLimiter(1)``, so calls into one model never
  overlap and the event loop never blocks.
* Only the tick loop mutates sequences. Pack, unpack and ``seq_rm`` happen between ticks,
  never concurrently with a step: a concurrent decode would tear the state.
* Sample-then-decode: every token handed back by a step is already in the KV cache, so a
  sequence may be packed after any tick and ``Request.context`` always describes its KV.
* The queue is FIFO and holds requests and control actions (adapter changes, evict) in
  arrival order. An exclusive control waits until no request runs: requests queued before
  it run with the old adapter set, requests after it with the new one, so a request is
  computed with the fingerprint it was keyed with.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup, TaskStatus

from .backends.types import Decode, LoadedModel, Prefill, Prefilled, Sampled, StepOp, StepResult
from .cache.key import (
    Namespace,
    common_prefix_tokens,
    effective_fingerprint,
    encode_tokens,
    kv_layout_hash,
    parse_key,
    quant_byte,
)
from .cache.policy import cold_save_point, passes_gate, wants_continued
from .cache.port import CachePort, Restore, SaveReason
from .config import CachePolicy, ModelConfig
from .errors import (
    BackendError,
    ErllamaError,
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    NotSupported,
    QueueFull,
)
from .events import (
    AdapterInfo,
    CacheHit,
    Done,
    FinishReason,
    ModelInfo,
    ModelStatus,
    Token,
)
from .fingerprint import file_sha256
from .plugins import Backend
from .request import Failure, InferStream, Request, RequestState
from .sampling import SamplerParams, validate_max_tokens

__all__ = ["ModelWorker"]

log = logging.getLogger("erllama.model")
T = TypeVar("T")


@attrs.define(eq=False)
class _Control:
    """An action run by the tick loop between ticks, in FIFO order with requests."""

    fn: Callable[[], Awaitable[Any]]
    exclusive: bool
    done: anyio.Event = attrs.Factory(anyio.Event)
    result: Any = None
    error: BaseException | None = None


@attrs.define(eq=False)
class _Adapter:
    handle: int
    native: Any
    path: str
    sha256: bytes
    scale: float


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
    ) -> None:
        self.id = model_id
        self.config = config
        self.backend = backend
        self.cache = cache
        self.policy = config.policy or policy
        self._on_request_done = on_request_done
        self.loaded: LoadedModel | None = None
        self.fingerprint = b""
        self.namespace_cache: dict[bytes, Namespace] = {}
        self._limiter = anyio.CapacityLimiter(1)
        self._queue: deque[Request | _Control] = deque()
        self._admitting: list[Request] = []
        self._running: dict[int, Request] = {}
        self._free_seqs: list[int] = []
        #: Free sequences still holding their last request's KV: (token bytes, fingerprint).
        self._live: dict[int, tuple[bytes, bytes]] = {}
        self.n_seq = config.n_seq_max
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._close_requested = anyio.Event()
        self.stopped = anyio.Event()
        self._closing = False
        self.state: ModelStatus = "loading"
        self.error: BaseException | None = None
        self._adapters: dict[int, _Adapter] = {}
        self._adapter_ids = itertools.count(1)
        self._refs = itertools.count(1)
        self.effective_fp = b""
        self.last_hit: CacheHit | None = None
        self.loaded_at = time.monotonic()
        self.last_used = self.loaded_at

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load, serve until closed, then free. Load errors reach ``task_status``'s caller."""
        # A load cannot be abandoned halfway (the native model would leak), so it finishes
        # shielded; a cancellation that arrived meanwhile is honoured right after, below.
        with anyio.CancelScope(shield=True):
            loaded = await self._native(self.backend.load, self.config)
        self.loaded = loaded
        try:
            await anyio.lowlevel.checkpoint()
            self.fingerprint = await self._fingerprint(loaded)
            self.effective_fp = self.fingerprint
            self.n_seq = min(self.config.n_seq_max, loaded.n_seq_max)
            self._free_seqs = list(range(self.n_seq))[::-1]
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._native(self.backend.free, loaded.handle)
            self.loaded = None
            raise
        self.state = "idle"
        self.loaded_at = self.last_used = time.monotonic()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                try:
                    await self._loop()
                except Exception:
                    # Failed: stay listed as "failed" (requests get ModelFailed) until unloaded.
                    await self._close_requested.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._free_native()
            self.stopped.set()

    async def close(self) -> None:
        """Cancel everything queued and running (shutdown saves first), free, and return."""
        self._closing = True
        if self.state != "failed":
            self.state = "unloading"
        for item in list(self._queue):
            if isinstance(item, Request):
                self.cancel(item, reason="shutdown")
        for req in [*self._admitting, *self._running.values()]:
            self.cancel(req, reason="shutdown")
        self._close_requested.set()
        self._wake.set()
        await self.stopped.wait()

    async def _free_native(self) -> None:
        if self.loaded is None:
            return
        loaded, self.loaded = self.loaded, None
        try:
            # ``free`` releases the adapters too (llama.cpp frees them with the model).
            await self._native(self.backend.free, loaded.handle)
        except Exception:
            log.exception("model %s: freeing the backend failed", self.id)
        self._adapters.clear()

    async def _fingerprint(self, loaded: LoadedModel) -> bytes:
        if self.config.fingerprint is not None:
            return bytes.fromhex(self.config.fingerprint)
        if loaded.fingerprint is not None:
            return bytes.fromhex(loaded.fingerprint)
        if self.config.model_path is not None:
            # Hashing a multi-GB file is I/O-bound; keep it off the loop but off the model
            # thread too (nothing else is queued on the model yet anyway).
            return bytes.fromhex(
                await anyio.to_thread.run_sync(file_sha256, self.config.model_path)
            )
        # A backend with neither a file nor its own identity: never the all-zero namespace.
        seed = f"{self.backend.name}:{sorted(self.config.options.items())!r}"
        return hashlib.sha256(seed.encode()).digest()

    async def _native(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

    def _handle(self) -> Any:
        if self.loaded is None:
            raise ModelNotFound(self.id)
        return self.loaded.handle

    def check_serving(self) -> None:
        if self.state == "failed":
            err = self.error
            detail = str(err) if err is not None else ""
            raise ModelFailed(self.id, self.backend.name, "serving", detail) from err
        if self._closing or self.loaded is None:
            raise ModelNotFound(self.id)

    def _fail(self, exc: BaseException) -> None:
        """A native failure: fail every request with a typed error; keep the engine up."""
        log.error("model %s failed: %s", self.id, exc, exc_info=exc)
        self.state = "failed"
        self.error = exc
        err = (
            exc
            if isinstance(exc, ErllamaError)
            else BackendError(self.backend.name, "serving", str(exc))
        )
        if err is not exc:
            err.__cause__ = exc
        pending = list(self._queue)
        self._queue.clear()
        for item in pending:
            if isinstance(item, _Control):
                item.error = err
                item.done.set()
        reqs = [
            *(i for i in pending if isinstance(i, Request)),
            *self._admitting,
            *self._running.values(),
        ]
        self._admitting.clear()
        self._running.clear()
        for req in reqs:
            self._deliver_failure(req, err)

    def _deliver_failure(self, req: Request, err: BaseException) -> None:
        if req.state is RequestState.DONE:
            return
        req.emit(Failure(err))
        self._complete(req)

    def _complete(self, req: Request) -> None:
        req.state = RequestState.DONE
        req.send.close()
        req.finished.set()
        self._on_request_done(req)

    # ---- observability (never waits on the worker) --------------------------------------

    @property
    def status(self) -> ModelStatus:
        if self.state != "idle":
            return self.state
        running = [*self._running.values(), *self._admitting]
        if any(r.prefilling or r.state is RequestState.ADMITTING for r in running):
            return "prefilling"
        return "generating" if running else "idle"

    @property
    def queue_len(self) -> int:
        return sum(1 for i in self._queue if isinstance(i, Request))

    def info(self) -> ModelInfo:
        loaded = self.loaded
        return ModelInfo(
            id=self.id,
            backend=self.backend.name,
            status=self.status,
            model_path=str(self.config.model_path) if self.config.model_path else None,
            capabilities=self.backend.capabilities,
            n_ctx=loaded.n_ctx if loaded else 0,
            n_seq_max=self.n_seq,
            n_vocab=loaded.n_vocab if loaded else 0,
            queue_len=self.queue_len,
            running=len(self._running) + len(self._admitting),
            fingerprint=self.fingerprint.hex(),
            effective_fingerprint=self.effective_fp.hex(),
            quant=self._quant_label(),
            last_cache_hit=self.last_hit,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            adapters=self.list_adapters(),
            error=str(self.error) if self.error is not None else None,
            metadata=dict(loaded.metadata) if loaded else {},
        )

    def _quant_label(self) -> str:
        if self.config.quant is not None:
            return self.config.quant
        return self.loaded.quant if self.loaded else "unknown"

    def namespace(self, fingerprint: bytes) -> Namespace:
        ns = self.namespace_cache.get(fingerprint)
        if ns is None:
            assert self.loaded is not None
            ns = Namespace(
                fingerprint, quant_byte(self._quant_label()), kv_layout_hash(self.loaded.kv_layout)
            )
            self.namespace_cache[fingerprint] = ns
        return ns

    # ---- requests -----------------------------------------------------------------------

    async def infer(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: Any,
        params: Mapping[str, Any],
        parent_key: str | bytes | None,
        add_special: bool,
        cancel: Callable[[str], None],
    ) -> tuple[Request, InferStream]:
        self.check_serving()
        if params.get("seed") is None:
            params = {**params, "seed": self.config.seed}
        sp = SamplerParams.build(**params)
        limit = validate_max_tokens(max_tokens)
        parent = None
        if parent_key is not None:
            try:
                parent = parse_key(parent_key)
            except ValueError as exc:
                raise InvalidRequest("parent_key", str(exc)) from None
        needs_sampler = not sp.is_greedy_default
        if needs_sampler and not self.backend.supports("sampler"):
            raise NotSupported(self.backend.name, "grammar" if sp.grammar else "sampler")
        self._check_queue_room()
        tokens = await self._prompt_tokens(prompt, add_special)
        sampler = None
        if needs_sampler:
            sampler = await self._native(self.backend.sampler_new, self._handle(), sp)
        try:
            self.check_serving()
            self._check_queue_room()
        except BaseException:
            if sampler is not None:
                await self._native(self.backend.sampler_free, self._handle(), sampler)
            raise
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        req = Request(
            ref=f"{self.id}#{next(self._refs)}",
            model_id=self.id,
            prompt=tuple(tokens),
            params=sp,
            max_tokens=limit,
            parent_key=parent,
            fingerprint=self.effective_fp,
            send=send,
            sampler=sampler,
        )
        self._queue.append(req)
        assert self._tg is not None
        self._tg.start_soon(self._request_task, req)
        self._wake.set()
        ref = req.ref
        return req, InferStream(ref, self.id, receive, lambda: cancel(ref))

    def _check_queue_room(self) -> None:
        # Requests that will get a free sequence at once are not "waiting".
        waiting = self.queue_len - len(self._free_seqs)
        if waiting >= self.config.max_queue:
            raise QueueFull(self.id, self.config.max_queue)

    async def _prompt_tokens(self, prompt: str | Sequence[int], add_special: bool) -> list[int]:
        assert self.loaded is not None
        if isinstance(prompt, str):
            tokens = await self._native(
                functools.partial(self.backend.tokenize, add_special=add_special),
                self._handle(),
                prompt,
            )
        elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
            tokens = self._checked_ids(cast("Sequence[int]", prompt), "prompt")
        else:
            raise InvalidRequest("prompt", "must be text or a sequence of token ids")
        if not tokens:
            raise InvalidRequest("prompt", "is empty")
        if len(tokens) >= self.loaded.n_ctx:
            raise InvalidRequest(
                "prompt",
                f"{len(tokens)} tokens do not fit the context of {self.loaded.n_ctx} "
                "(at least one token must be left for generation)",
            )
        return tokens

    def _checked_ids(self, tokens: Sequence[int], param: str) -> list[int]:
        """Token ids as a list, each an int inside the vocabulary (checked here, before any
        native call: an out-of-range id would make llama.cpp abort the process)."""
        assert self.loaded is not None
        n_vocab = self.loaded.n_vocab
        ids = [*tokens]
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                raise InvalidRequest(
                    param, f"token id {t!r} is outside the vocabulary (0..{n_vocab - 1})"
                )
        return ids

    async def _request_task(self, req: Request) -> None:
        """Holds the request's cancel scope: cancelling it cancels the request."""
        with req.scope:
            await req.finished.wait()
        if not req.finished.is_set():
            self.cancel(req)
            # The loop finishes it between ticks (a finish save may run first).
            with anyio.CancelScope(shield=True):
                await req.finished.wait()

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """Idempotent. A queued request ends at once; a running one before its next token."""
        if req.state is RequestState.DONE:
            return
        if req.state is RequestState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(req)
            req.emit(
                Done(finish_reason="cancelled", stats=req.stats("cancelled", time.monotonic()))
            )
            if req.sampler is not None and self._tg is not None and self.loaded is not None:
                self._tg.start_soon(self._free_sampler, req.sampler)
            self._complete(req)
            return
        if not req.cancel_requested:
            req.cancel_requested = True
            req.cancel_reason = reason
        self._wake.set()

    async def _free_sampler(self, sampler: Any) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._native(self.backend.sampler_free, self._handle(), sampler)
            except ErllamaError:
                log.warning("model %s: freeing a sampler failed", self.id, exc_info=True)

    # ---- controls (run between ticks, FIFO with requests) -------------------------------

    async def control(self, fn: Callable[[], Awaitable[T]], *, exclusive: bool) -> T:
        self.check_serving()
        ctl = _Control(fn=fn, exclusive=exclusive)
        self._queue.append(ctl)
        self._wake.set()
        await ctl.done.wait()
        if ctl.error is not None:
            raise ctl.error
        result: T = ctl.result
        return result

    # ---- the tick loop --------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            while True:
                self._wake = anyio.Event()
                progressed = await self._between_ticks()
                if self._closing and not (self._queue or self._admitting or self._running):
                    return
                if self._running:
                    await self._tick()
                elif not progressed:
                    await self._wake.wait()
        except Exception as exc:
            self._fail(exc)
            raise
        finally:
            # Cancelled from outside (hard engine exit): end every stream so no request
            # task waits forever on a loop that is gone.
            for req in [*self._admitting, *self._running.values()]:
                if req.state is not RequestState.DONE:
                    req.emit(
                        Done(
                            finish_reason="cancelled",
                            stats=req.stats("cancelled", time.monotonic()),
                        )
                    )
                    self._complete(req)
            for item in self._queue:
                if isinstance(item, Request) and item.state is not RequestState.DONE:
                    self.cancel(item)
                elif isinstance(item, _Control) and not item.done.is_set():
                    item.error = ModelNotFound(self.id)
                    item.done.set()

    async def _between_ticks(self) -> bool:
        progressed = False
        for req in [r for r in self._running.values() if r.cancel_requested]:
            await self._finish(req, "cancelled")
            progressed = True
        for req in [r for r in self._admitting if r.lookup_done]:
            self._admitting.remove(req)
            if req.cancel_requested:
                if req.restore is not None:
                    self.cache.release(req.restore)
                    req.restore = None
                self._release_seq(req)
                await self._end_request(req, "cancelled")
            else:
                await self._setup_sequence(req)
            progressed = True
        while self._queue:
            head = self._queue[0]
            if isinstance(head, _Control):
                if head.exclusive and (self._running or self._admitting):
                    break
                self._queue.popleft()
                try:
                    head.result = await head.fn()
                except Exception as exc:
                    head.error = exc
                    if not isinstance(exc, ErllamaError):
                        raise
                finally:
                    head.done.set()
                progressed = True
                continue
            if not self._free_seqs:
                break
            self._queue.popleft()
            self._admit(head)
            progressed = True
        return progressed

    def _admit(self, req: Request) -> None:
        req.seq, req.live_len = self._pick_seq(req)
        self._free_seqs.remove(req.seq)
        req.state = RequestState.ADMITTING
        req.admitted_at = self.last_used = time.monotonic()
        self._admitting.append(req)
        if not self.cache.enabled:
            req.lookup_done = True
            return
        assert self._tg is not None
        self._tg.start_soon(self._lookup, req)

    def _pick_seq(self, req: Request) -> tuple[int, int]:
        """The free sequence whose live KV shares the longest useful prefix with the prompt
        (computed under the request's fingerprint). A prefix shorter than ``min_tokens`` is
        not worth spoiling another prompt's live KV for: then an empty sequence is taken."""
        prompt = encode_tokens(req.prompt) if self._live else b""
        floor = min(self.policy.min_tokens, len(req.prompt))
        best: tuple[int, int, int] | None = None  # (usable prefix, empty?, seq)
        for seq in self._free_seqs:
            live = self._live.get(seq)
            n = 0
            if live is not None and live[1] == req.fingerprint and self.config.keep_live_kv:
                n = common_prefix_tokens(live[0], prompt)
            candidate = (n if n >= floor else 0, live is None, seq)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        assert best is not None
        return best[2], best[0]

    async def _lookup(self, req: Request) -> None:
        """Off the model thread: find and read the best cache row while others keep ticking."""
        try:
            req.restore = await self.cache.lookup(
                self.namespace(req.fingerprint),
                req.prompt,
                req.parent_key,
                self.policy,
                longer_than=req.live_len,
            )
        except Exception:
            log.exception("model %s: cache lookup failed; serving cold", self.id)
            req.restore = None
        finally:
            req.lookup_done = True
            self._wake.set()

    async def _setup_sequence(self, req: Request) -> None:
        """Put the prompt's best known prefix into the request's sequence, or clear it.

        The prefix comes from a cache row (restored), from the sequence's own live KV kept
        from its previous request (cells past the common prefix removed), or nowhere (cold).
        States carry no logits. A partial hit needs none from the known part: the rest of the
        prompt is prefilled after all its cells, exactly as the cold run (with the same chunk
        boundaries) would. Only an exact hit drops the last cell and decodes that one token
        again, alone, as it was decoded when the cell was first made; so greedy output after a
        hit matches the unbroken run bit for bit.
        """
        handle = self._handle()
        seq = req.seq
        assert seq is not None
        had_live = self._live.pop(seq, None) is not None
        restore: Restore | None = req.restore
        req.restore = None
        n_prompt = len(req.prompt)
        if restore is not None:
            exact = len(restore.tokens) == n_prompt
            keep = len(restore.tokens) - 1 if exact else None
            try:
                await self._native(
                    self._restore_native, handle, seq, restore.payload, keep, had_live
                )
            except BackendError as exc:
                self.cache.reject(restore, str(exc))
                restore, req.live_len = None, 0
            finally:
                if restore is not None:
                    self.cache.release(restore)
        if restore is not None:
            known = len(restore.tokens)
            req.hit = CacheHit(
                kind="exact" if exact else "partial",
                prefix_len=known,
                source=restore.source,
                tier=restore.tier,
            )
        elif req.live_len:
            known = req.live_len
            exact = known == n_prompt
            await self._native(
                self.backend.seq_rm, handle, seq, known - 1 if exact else known, None
            )
            req.hit = CacheHit(
                kind="exact" if exact else "partial", prefix_len=known, source="live"
            )
            self.cache.note_live_hit()
        else:
            known, exact = 0, False
            await self._native(self.backend.seq_rm, handle, seq, 0, None)
            req.hit = CacheHit(kind="cold", prefix_len=0)
        req.context = list(req.prompt[: known - 1 if exact else known])
        self.last_hit = req.hit
        rest = list(req.prompt[len(req.context) :])
        point = cold_save_point(n_prompt, self.policy) if self.cache.enabled else None
        if point is not None and point > known:
            cut = point - len(req.context)
            req.cursor, req.cold_rest = rest[:cut], rest[cut:]
        else:
            req.cursor, req.cold_rest = rest, None
        req.last_save_at = known
        req.state = RequestState.RUNNING
        self._running[seq] = req

    def _restore_native(
        self,
        handle: Any,
        seq: int,
        payload: bytes | bytearray | memoryview,
        keep: int | None,
        clear: bool,
    ) -> None:
        if clear:
            self.backend.seq_rm(handle, seq, 0, None)
        self.backend.kv_unpack(handle, seq, payload)
        if keep is not None:
            self.backend.seq_rm(handle, seq, keep, None)

    def _release_seq(self, req: Request) -> None:
        if req.seq is not None:
            self._free_seqs.append(req.seq)
            req.seq = None

    def _build_ops(self) -> list[StepOp]:
        budget = self.config.n_batch
        chunk = self.config.effective_prefill_chunk
        ops: list[StepOp] = []
        # Decoders first and never sliced; prefills share what is left, head first.
        for seq, req in self._running.items():
            if not req.prefilling:
                ops.append(Decode(seq=seq, sampler=req.sampler))
                budget -= 1
        for seq, req in self._running.items():
            if req.prefilling and budget > 0:
                if not req.cursor:
                    continue
                n = min(len(req.cursor), budget, chunk)
                last = n == len(req.cursor) and not req.cold_rest
                ops.append(Prefill(seq=seq, tokens=tuple(req.cursor[:n]), logits=last))
                budget -= n
        return ops

    def _step_native(
        self, handle: Any, ops: Sequence[StepOp]
    ) -> tuple[Sequence[StepResult], dict[int, bytes], set[int]]:
        """On the model thread: one step, the text piece of every sampled token, and the
        sequences whose token was already streamed from inside the step."""
        pieces: dict[int, bytes] = {}
        streamed: set[int] = set()

        def on_sampled(seq: int, token: int) -> None:
            # Called between sampling and the forward pass: hand the token to the loop now.
            piece = self.backend.detokenize(handle, [token])
            pieces[seq] = piece
            if anyio.from_thread.run_sync(self._stream_early, seq, token, piece):
                streamed.add(seq)

        results = self.backend.step(handle, ops, on_sampled)
        for r in results:
            if isinstance(r, Sampled) and r.seq not in pieces:
                pieces[r.seq] = self.backend.detokenize(handle, [r.token])
        return results, pieces, streamed

    def _stream_early(self, seq: int, token: int, piece: bytes) -> bool:
        """On the loop, mid-step: stream a just-sampled token before it is decoded."""
        req = self._running.get(seq)
        if req is None or req.cancel_requested:
            return False
        self._deliver(req, token, piece)
        return True

    @staticmethod
    def _deliver(req: Request, token: int, piece: bytes) -> None:
        """Stream one token; the incremental decoder holds back half a character."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.emit(Token(text=req.decoder.decode(piece), token_id=token))

    async def _tick(self) -> None:
        ops = self._build_ops()
        if not ops:
            return
        results, pieces, streamed = await self._native(self._step_native, self._handle(), ops)
        now = time.monotonic()
        sent = {op.seq: op for op in ops}
        finishing: list[tuple[Request, FinishReason]] = []
        for res in results:
            req = self._running.get(res.seq)
            op = sent.get(res.seq)
            if req is None or op is None:
                raise BackendError(
                    self.backend.name, "step", f"result for unknown sequence {res.seq}"
                )
            if isinstance(res, Prefilled):
                assert isinstance(op, Prefill)
                del req.cursor[: len(op.tokens)]
                req.context.extend(op.tokens)
                if not req.cursor and req.cold_rest is not None:
                    # KV holds exactly the aligned prefix: the one moment to save it.
                    await self._save(req, "cold")
                    req.cursor, req.cold_rest = req.cold_rest, None
                if not req.prefilling:
                    req.prefill_done_at = now
            else:
                req.context.append(res.token)
                req.generated.append(res.token)
                if req.first_token_at is None:
                    req.first_token_at = now
                if req.cancel_requested:
                    continue  # finished as cancelled between ticks; the token stays unsent
                if res.seq not in streamed:
                    self._deliver(req, res.token, pieces.get(res.seq, b""))
                reason = self._finish_reason(req, res)
                if reason is not None:
                    finishing.append((req, reason))
                elif self.cache.enabled and wants_continued(
                    len(req.context), req.last_save_at, self.policy
                ):
                    await self._save(req, "continued")
        for req, reason in finishing:
            await self._finish(req, reason)

    def _finish_reason(self, req: Request, res: Sampled) -> FinishReason | None:
        assert self.loaded is not None
        if res.eog or res.token in self.loaded.eog_tokens:
            return "stop"
        if req.max_tokens is not None and len(req.generated) >= req.max_tokens:
            return "length"
        if len(req.context) >= self.loaded.n_ctx:
            return "length"
        return None

    # ---- saves and finishing --------------------------------------------------------------

    async def _save(self, req: Request, reason: SaveReason) -> bytes | None:
        """Pack between ticks on the model thread, hand the bytes to the cache's writers."""
        if not self.cache.enabled or req.seq is None:
            return None
        ns = self.namespace(req.fingerprint)
        tokens = tuple(req.context)
        if not passes_gate(len(tokens), reason, self.policy):
            return None
        key, pack = self.cache.prepare_save(ns, tokens, reason, self.policy)
        if pack:
            t0 = time.perf_counter()
            payload = await self._native(self.backend.kv_pack, self._handle(), req.seq)
            self.cache.note_pack(time.perf_counter() - t0)
            key = self.cache.save(ns, tokens, payload, reason)
            if key is not None:
                req.created_keys = max(req.created_keys, len(tokens) - req.hit.prefix_len)
        if key is not None:
            req.last_save_at = len(tokens)
        return key

    async def _finish(self, req: Request, reason: FinishReason) -> None:
        save_reason: SaveReason = "shutdown" if req.cancel_reason == "shutdown" else "finish"
        if req.context:
            key = await self._save(req, save_reason)
            if key is not None:
                req.finish_key = key.hex()
        assert req.seq is not None
        self._running.pop(req.seq, None)
        if self.config.keep_live_kv:
            # Keep the cells: the next prompt admitted here may share a prefix with them.
            self._live[req.seq] = (encode_tokens(req.context), req.fingerprint)
        else:
            await self._native(self.backend.seq_rm, self._handle(), req.seq, 0, None)
        self._release_seq(req)
        await self._end_request(req, reason)

    async def _end_request(self, req: Request, reason: FinishReason) -> None:
        if req.sampler is not None:
            await self._native(self.backend.sampler_free, self._handle(), req.sampler)
            req.sampler = None
        req.emit(Done(finish_reason=reason, stats=req.stats(reason, time.monotonic())))
        self._complete(req)

    async def evict(self) -> int:
        """Evict-save every in-flight sequence (between ticks); returns the rows saved."""

        async def run() -> int:
            saved = 0
            for req in list(self._running.values()):
                if req.context and await self._save(req, "evict") is not None:
                    saved += 1
            return saved

        return await self.control(run, exclusive=False)

    # ---- text utilities -------------------------------------------------------------------

    async def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.check_serving()
        if not isinstance(text, str):
            raise InvalidRequest("text", "must be a string")
        fn = functools.partial(
            self.backend.tokenize, add_special=add_special, parse_special=parse_special
        )
        return await self._native(fn, self._handle(), text)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        self.check_serving()
        ids = self._checked_ids(tokens, "tokens")
        raw = await self._native(self.backend.detokenize, self._handle(), ids)
        return raw.decode("utf-8", errors="replace")

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> list[int]:
        self.check_serving()
        self.backend.require("chat_template")
        given: object = messages
        if not isinstance(given, list | tuple):
            raise InvalidRequest("messages", "must be a list of {'role', 'content'} mappings")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise InvalidRequest(f"messages[{i}]", "needs string 'role' and 'content'")
        return await self._native(
            self.backend.apply_chat_template,
            self._handle(),
            list(messages),
            system,
            list(tools) if tools is not None else None,
            add_generation_prompt,
        )

    async def embed(self, prompt: str | Sequence[int]) -> list[float]:
        self.check_serving()
        self.backend.require("embed")
        if not self.config.embeddings:
            raise NotSupported(self.backend.name, "embed (ModelConfig.embeddings is off)")
        tokens = await self._prompt_tokens(prompt, add_special=True)
        return await self._native(self.backend.embed, self._handle(), tokens)

    # ---- adapters -------------------------------------------------------------------------

    def list_adapters(self) -> tuple[AdapterInfo, ...]:
        return tuple(
            AdapterInfo(handle=a.handle, path=a.path, scale=a.scale, sha256=a.sha256.hex())
            for a in self._adapters.values()
        )

    async def load_adapter(self, path: str) -> int:
        self.check_serving()
        self.backend.require("adapters")
        if not isinstance(path, str) or not path:
            raise InvalidRequest("path", "must be a file path")

        async def run() -> int:
            try:
                sha = bytes.fromhex(await anyio.to_thread.run_sync(file_sha256, path))
            except OSError as exc:
                raise InvalidRequest(
                    "path", f"cannot read adapter {path!r}: {exc.strerror}"
                ) from exc
            native = await self._native(self.backend.adapter_load, self._handle(), path)
            handle = next(self._adapter_ids)
            self._adapters[handle] = _Adapter(handle, native, path, sha, 1.0)
            await self._apply_adapters()
            return handle

        return await self.control(run, exclusive=True)

    async def unload_adapter(self, handle: int) -> None:
        self.check_serving()
        self.backend.require("adapters")

        async def run() -> None:
            ad = self._adapters.pop(handle, None)
            if ad is None:
                return  # idempotent
            await self._apply_adapters()
            await self._native(self.backend.adapter_free, self._handle(), ad.native)

        await self.control(run, exclusive=True)

    async def set_adapter_scale(self, handle: int, scale: float) -> None:
        self.check_serving()
        self.backend.require("adapters")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
        ):
            raise InvalidRequest("scale", f"must be a finite number, got {scale!r}")

        async def run() -> None:
            ad = self._adapters.get(handle)
            if ad is None:
                raise InvalidRequest("handle", f"no adapter {handle} on model {self.id!r}")
            ad.scale = float(scale)
            await self._apply_adapters()

        await self.control(run, exclusive=True)

    async def _apply_adapters(self) -> None:
        active = [(a.native, a.scale) for a in self._adapters.values()]
        await self._native(self.backend.adapters_apply, self._handle(), active)
        self.effective_fp = effective_fingerprint(
            self.fingerprint, [(a.sha256, a.scale) for a in self._adapters.values()]
        )
