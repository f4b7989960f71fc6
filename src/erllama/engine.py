"""The engine: root task group, model registry, in-flight table and the public API."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Unpack

import anyio
from anyio.abc import TaskGroup

from .cache.catalog import Row
from .cache.counters import CacheCounters
from .cache.key import decode_tokens
from .cache.manager import KVCache
from .cache.port import CachePort, NullCache
from .cache.records import RecordStore
from .cluster.prefixes import BLOCK, PrefixSummary
from .config import (
    CACHE_TIERS,
    MAX_DRAFT,
    EngineConfig,
    ModelConfig,
    load_config,
    structure_config,
)
from .errors import (
    CacheError,
    ConfigError,
    InvalidRequest,
    ModelAlreadyLoaded,
    ModelNotFound,
    UnloadTimeout,
)
from .events import (
    AdapterInfo,
    CachedPrefix,
    CachedRow,
    CacheExplanation,
    Completion,
    ModelInfo,
    ModelState,
    ModelStatus,
    Verification,
)
from .grammar import response_format_grammar
from .lifecycle import Hold, KeepAlive, Lifecycle
from .model import ModelWorker, intake
from .model.output import Signer
from .model.request import Request
from .options import RequestOptions, SamplingOptions
from .plugins import BackendRegistry, make_backend_registry
from .pressure import DeviceMemory, PressureResult, PressureStatus
from .pressure.nvidia_smi import gpu_memory
from .pressure.registry import PressureSourceRegistry, SourcePlugin, make_pressure_registry
from .pressure.scheduler import PressureScheduler
from .speculative.primitives import FixedDraft, read_verification
from .speculative.registry import DrafterRegistry, make_drafter_registry
from .stream import InferStream

__all__ = ["Engine", "open_engine"]

log = logging.getLogger("erllama.engine")

#: How long leaving the engine may spend on shutdown saves and unloads before giving up.
SHUTDOWN_TIMEOUT_S = 60.0


class Engine:
    """Serves loaded models. Get one from :func:`open_engine`; never construct it directly."""

    def __init__(
        self,
        config: EngineConfig,
        task_group: TaskGroup,
        backends: BackendRegistry,
        cache: KVCache | None,
        pressure_source: SourcePlugin | None,
        drafters: DrafterRegistry | None = None,
    ) -> None:
        self.config = config
        self._tg = task_group
        self._backends = backends
        self._drafters = drafters if drafters is not None else make_drafter_registry()
        #: The cache (None when off) and what models see of it (a null port when off).
        self._kv = cache
        self._cache: CachePort = cache if cache is not None else NullCache()
        dirs = config.cache.record_dirs if cache is not None else []
        #: Each model's replies for exact replay, beside the rows (none without file tiers).
        self._reply_store = (
            RecordStore(dirs, "replies", config.cache.records)
            if dirs and config.cache.records
            else None
        )
        self._models: dict[str, ModelWorker] = {}
        self._inflight: dict[str, tuple[ModelWorker, Request]] = {}
        self._auto_ids = itertools.count(1)
        key = config.thinking_signing_key
        self._signer = Signer(key.encode("utf-8")) if key else None
        self._closed = False
        self._lifecycle = Lifecycle(self, config.max_loaded_models)
        self._pressure = PressureScheduler(
            config.pressure, pressure_source, cache=cache, models=_PressureModels(self)
        )

    # ---- models ---------------------------------------------------------------------------

    async def load_model(
        self,
        model_id: str | ModelConfig | None = None,
        config: ModelConfig | Mapping[str, Any] | None = None,
    ) -> str:
        """Load a model and start serving it; returns its id (generated when None).

        With ``EngineConfig.max_loaded_models`` models loaded, the least recently used idle
        one is unloaded first (or the load waits until one is idle). A model the engine did
        not know becomes known until an explicit :meth:`unload`: its keep-alive may unload
        it, and its next use loads it again.

        Raises ModelAlreadyLoaded, ConfigError (bad config, unknown backend) or BackendError
        (missing or malformed model file); a failed load leaves nothing behind.
        """
        if isinstance(model_id, ModelConfig) and config is None:
            model_id, config = None, model_id
        config = _model_config(config)
        if model_id is None:
            model_id = self._next_id()
        elif not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("model_id", "must be a non-empty string")
        if self._closed:
            raise ModelNotFound(model_id)
        if model_id in self._models:
            raise ModelAlreadyLoaded(model_id)
        self._backends.get(config.backend)  # ConfigError for an unknown one, before anything
        await self._lifecycle.load(model_id, config)
        return model_id

    def register_model(self, model_id: str, config: ModelConfig | Mapping[str, Any]) -> None:
        """Make a model known without loading it: its first use (or :meth:`ensure_loaded`)
        loads it, its keep-alive unloads it, and an explicit :meth:`unload` leaves it known,
        as for the models of ``EngineConfig.models``. ModelAlreadyLoaded for an id the
        engine knows already; ConfigError for a bad config or an unknown backend."""
        config = _model_config(config)
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("model_id", "must be a non-empty string")
        if model_id in self._lifecycle.known or model_id in self._models:
            raise ModelAlreadyLoaded(model_id)
        self._backends.get(config.backend)
        self._lifecycle.register(model_id, config, configured=True)

    async def ensure_loaded(
        self,
        model_id: str,
        *,
        keep_alive_s: float | KeepAlive | None = KeepAlive.DEFAULT,
        wait_s: float | None = None,
    ) -> ModelInfo:
        """Load a known model unless it is loaded, and return its snapshot. Concurrent
        callers wait for the same load, which goes on in the engine even when they stop
        waiting: past ``wait_s`` (None: no limit) ModelLoading, and the load goes on. A
        failed load raises its error (BackendError, ConfigError) to every caller that
        waited for it; the next call tries again. ModelNotFound for a model the engine
        does not know.

        It counts as a use: the model's keep-alive runs from now, and ``keep_alive_s``
        sets it from this use on (None or negative: kept loaded for good; 0: unloaded once
        idle; left out: the config's ``keep_alive_s``)."""
        async with self.hold(model_id, keep_alive_s=keep_alive_s, wait_s=wait_s) as info:
            return info

    def hold(
        self,
        model_id: str,
        *,
        keep_alive_s: float | KeepAlive | None = KeepAlive.DEFAULT,
        wait_s: float | None = None,
    ) -> AbstractAsyncContextManager[ModelInfo]:
        """``async with engine.hold(model_id) as info:`` :meth:`ensure_loaded`, then keep
        the model loaded for the block: its keep-alive, ``max_loaded_models`` and memory
        pressure never unload it while held (an explicit :meth:`unload` still does). Its
        keep-alive runs from the end of the block (or of the last request it ran, if
        later)."""
        return self._hold(model_id, keep_alive_s, wait_s)

    @asynccontextmanager
    async def _hold(
        self, model_id: str, keep_alive_s: float | KeepAlive | None, wait_s: float | None
    ) -> AsyncIterator[ModelInfo]:
        held = await self._lifecycle.acquire(model_id, keep_alive_s, wait_s)
        try:
            yield held.worker.info()
        finally:
            self._lifecycle.release(held)

    def _use(self, model_id: str) -> _Use:
        """``async with self._use(model_id) as worker``: a call that uses a model, loaded
        first if known and not loaded, held while the call runs (its keep-alive rule
        unchanged)."""
        return _Use(self._lifecycle, model_id)

    def model_states(self) -> list[ModelState]:
        """Every model the engine knows, loaded or not: its lifecycle state (``loaded``,
        ``loading``, ``unloading``, ``unloaded``, ``failed``), keep-alive, last use and
        expiry. Never waits."""
        return self._lifecycle.states()

    async def expire_models(self) -> list[str]:
        """Unload now every idle model whose keep-alive has passed (the engine's expiry
        task does this on its own when one runs out); returns their ids."""
        return await self._lifecycle.expire()

    def _new_worker(self, model_id: str, config: ModelConfig) -> ModelWorker:
        """A worker for ``config``, registered under ``model_id`` (so a concurrent load of
        the same id is refused) but not started."""
        if self._closed:
            raise ModelNotFound(model_id)
        if model_id in self._models:
            raise ModelAlreadyLoaded(model_id)
        backend = self._backends.get(config.backend)
        spec = config.speculative
        # An unknown drafter is refused here, before anything loads.
        drafter = self._drafters.get(spec.drafter) if spec is not None else None
        worker = ModelWorker(
            model_id,
            config,
            backend,
            self._cache,
            self.config.cache.policy,
            self._request_done,
            signer=self._signer,
            reply_store=self._reply_store,
            drafter=drafter,
        )
        self._models[model_id] = worker
        return worker

    async def _start_worker(self, worker: ModelWorker) -> None:
        try:
            await self._tg.start(worker.run)
        except BaseException:
            if self._models.get(worker.id) is worker:
                self._models.pop(worker.id)
            raise

    async def _close_worker(self, model_id: str, worker: ModelWorker) -> None:
        try:
            await worker.close()
        except UnloadTimeout:
            raise
        except BaseException:
            if self._models.get(model_id) is worker:
                self._models.pop(model_id)
            raise
        if self._models.get(model_id) is worker:
            self._models.pop(model_id)

    def _next_id(self) -> str:
        while True:
            candidate = f"model-{next(self._auto_ids)}"
            if candidate not in self._models and candidate not in self._lifecycle.known:
                return candidate

    def _worker(self, model_id: str) -> ModelWorker:
        worker = self._models.get(model_id)
        if worker is None or worker.state == "loading":
            raise ModelNotFound(model_id)
        return worker

    async def unload(self, model_id: str) -> None:
        """Stop serving a model: queued and running requests end cancelled (running ones
        saved first with reason ``shutdown``), then the backend is freed. Works on failed
        models too. A model of ``EngineConfig.models`` (or ``register_model``) stays known:
        its next use loads it again; one that ``load_model`` brought in is forgotten.

        Calls that arrive once the unload has begun are refused with ModelUnloading. Calls
        still using the model's native handle off its thread (tokenize, a chat template
        ...) are waited for, up to ``erllama.model.gate.UNLOAD_WAIT_S`` (30 s); past that
        the unload raises UnloadTimeout and the model keeps serving: it is never freed
        under a caller."""
        self._worker(model_id)
        await self._lifecycle.unload(model_id)

    async def unload_model(self, model_id: str) -> None:
        """Alias of :meth:`unload`."""
        await self.unload(model_id)

    async def evict(self, model_id: str) -> int:
        """Save every in-flight sequence of the model now (reason ``evict``); returns how many
        rows were saved. Generation continues."""
        return await self._worker(model_id).ops.evict()

    def status(self, model_id: str) -> ModelStatus:
        """idle, prefilling, generating, failed, loading (while ``load_model`` runs) or
        unloading; never waits."""
        worker = self._models.get(model_id)
        if worker is None:
            raise ModelNotFound(model_id)
        return worker.status

    def list_models(self) -> list[ModelInfo]:
        """Every model, those still loading included (status ``loading``)."""
        return [w.info() for w in self._models.values()]

    def model_info(self, model_id: str) -> ModelInfo:
        """A snapshot; a model still loading reports status ``loading``."""
        worker = self._models.get(model_id)
        if worker is None:
            raise ModelNotFound(model_id)
        return worker.info()

    # ---- generation -----------------------------------------------------------------------

    async def infer(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        **kwargs: Unpack[RequestOptions],
    ) -> InferStream:
        """Queue a request and return its stream at once (before it runs).

        ``prompt`` is text (tokenised with BOS when ``add_special``, the default) or token
        ids. Every keyword is checked here (``erllama.model.intake.RequestArgs``): a bad
        value raises InvalidRequest naming it (a grammar that does not parse too), before
        anything runs; an unknown keyword is a TypeError.

        - ``max_tokens=None`` (the default) generates until end of generation or a full
          context.
        - Sampling: ``temperature`` (0: greedy, the default), ``top_k``, ``top_p``,
          ``min_p``, ``repetition_penalty``, ``grammar`` (GBNF text); see
          :class:`~erllama.SamplerParams` for the chain and the ranges.
        - ``seed=None`` draws a fresh seed (reported in ``Stats.seed``) unless
          ``ModelConfig.seed`` sets one.
        - ``stop``: up to 16 strings (256 bytes each); the request ends at the earliest
          match, which is never streamed (``finish_reason="stop"``, ``Stats.stop_sequence``).
        - ``thinking=True`` on a model with thinking markers streams the thinking span as
          ``ThinkingDelta`` events and a ``ThinkingEnd``; ``thinking_budget_tokens`` caps
          it (the engine then closes the span in the model's context).
        - ``session_id`` keeps the request's sequence for the session's next request
          (``SessionBusy`` while one is queued or running; see ``end_session``).
        - ``parent_key`` is a previous ``finish_key`` to resume from.
        - ``cache_salt``: only requests with the same salt share cached KV (rows and a
          sequence's leftover live KV); a server passes one per API key, so one tenant
          cannot learn another's prompts from cache hits (None: shared with every
          unsalted request).
        - ``logprobs=N``: each answer token's log-probability and N alternatives.
        """
        args = intake.RequestArgs.build(**kwargs)
        return await self._infer(model_id, prompt, args)

    async def _infer(
        self, model_id: str, prompt: str | Sequence[int], args: intake.RequestArgs, **kw: Any
    ) -> InferStream:
        async with self._use(model_id) as worker:
            req, stream = await worker.infer(prompt, args, cancel=self.cancel, **kw)
        if not req.finished.is_set():
            self._inflight[req.ref] = (worker, req)
        return stream

    async def complete(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        **kwargs: Unpack[RequestOptions],
    ) -> Completion:
        """Run a request to the end and return its :class:`Completion`. Takes the keyword
        arguments of :meth:`infer`. Cancelling the caller cancels the request in the model."""
        stream = await self.infer(model_id, prompt, **kwargs)
        async with stream:
            return await stream.collect()

    async def chat(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        **kwargs: Unpack[SamplingOptions],
    ) -> InferStream:
        """Render ``messages`` with the model's chat template and run them; returns the
        stream of typed events (``Token`` text, ``ThinkingDelta``/``ThinkingEnd``,
        ``ToolCallDelta``/``ToolCallEnd``, then ``Done``).

        ``tools`` go to the template (or, for a template that knows no tools, into the
        system prompt). ``response_format`` constrains the answer through a grammar:
        ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
        ...}}``. Takes the keyword arguments of :meth:`infer`. Replay a tool call's exact
        ``ToolCallEnd.text`` as the assistant's content next turn, so the cached prefix
        keeps matching.
        """
        grammar = response_format_grammar(response_format)
        if grammar is not None:
            if kwargs.get("grammar") is not None:
                raise InvalidRequest("grammar", "give grammar or response_format, not both")
            kwargs["grammar"] = grammar
        # Held across both calls: the model cannot unload between the render and the queue.
        async with self._use(model_id):
            prompt = await self.apply_chat_template(model_id, messages, system, tools)
            return await self.infer(model_id, prompt, **kwargs)

    async def prefill_only(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        *,
        parent_key: str | bytes | None = None,
        session_id: str | None = None,
        cache_salt: str | None = None,
        add_special: bool = True,
    ) -> str | None:
        """Put ``prompt`` into the KV without generating, save it (whatever the policy's
        minimum length) and return its key (hex): a later request (or ``parent_key``)
        starting with these tokens restores them. None when the cache is off or dropped
        the save (its writers were full)."""
        args = intake.RequestArgs.build(
            parent_key=parent_key,
            session_id=session_id,
            add_special=add_special,
            cache_salt=cache_salt,
        )
        stream = await self._infer(model_id, prompt, args, prefill_only=True)
        async with stream:
            done = (await stream.collect()).stats
        return done.finish_key

    async def end_session(self, model_id: str, session_id: str) -> None:
        """Release a session's sequence (after an evict save, so the session comes back
        warm from the cache). Idempotent: an unknown session is ignored; a session whose
        request is still running is released when that request ends."""
        await self._worker(model_id).ops.end_session(session_id)

    def cancel(self, ref: str) -> None:
        """Cancel a request by ``stream.ref``. Idempotent; silent for unknown or finished refs.

        A queued request ends at once (its stream gets ``Done("cancelled")``, it never runs);
        a running one stops before its next token. ``ref`` that is not a string (a stream
        passed by mistake, say) raises TypeError.
        """
        if not isinstance(ref, str):
            raise TypeError(
                f"cancel() takes a request ref (stream.ref, a str), not {type(ref).__name__}"
            )
        entry = self._inflight.get(ref)
        if entry is None:
            return
        worker, req = entry
        req.scope.cancel()
        worker.cancel(req)

    def _request_done(self, req: Request) -> None:
        self._inflight.pop(req.ref, None)
        # A request's ref is "<model id>#<n>": its model's keep-alive runs from now.
        self._lifecycle.used(req.ref.rpartition("#")[0])

    # ---- text -----------------------------------------------------------------------------

    async def draft_tokens(self, model_id: str, context: Sequence[int], n: int) -> list[int]:
        """Up to ``n`` tokens the model's drafter (``ModelConfig.speculative``) proposes to
        follow ``context`` (token ids): the ``ngram`` drafter looks its last tokens up in
        ``context`` itself. InvalidRequest for a model loaded without speculative decoding.
        Pair it with :meth:`verify` to drive speculation yourself."""
        async with self._use(model_id) as worker:
            return await worker.draft_tokens(context, n)

    async def verify(
        self,
        model_id: str,
        context: Sequence[int],
        draft: Sequence[int],
        *,
        cache_salt: str | None = None,
    ) -> Verification:
        """How many leading tokens of ``draft`` the model would generate itself after
        ``context`` (greedily), and its own next token: one forward pass over the draft,
        after ``context`` is restored from the cache (or prefilled). Any model whose backend
        verifies drafts takes it, with or without ``ModelConfig.speculative``; with the
        llama.cpp backend the answer equals plain greedy decoding bit for bit only under
        the settings ``speculative`` enforces (docs/speculative.md "Exactness")."""
        ids = list(draft)
        if not ids or len(ids) > MAX_DRAFT:
            raise InvalidRequest("draft", f"must hold 1 to {MAX_DRAFT} token ids")
        fixed = FixedDraft(len(context), ids)
        args = intake.RequestArgs.build(
            max_tokens=len(ids) + 1, temperature=0.0, cache_salt=cache_salt
        )
        stream = await self._infer(model_id, list(context), args, drafter=fixed)
        return await read_verification(stream, fixed)

    async def tokenize(
        self, model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        async with self._use(model_id) as worker:
            return await worker.text.tokenize(text, add_special, parse_special)

    async def detokenize(
        self, model_id: str, tokens: Sequence[int], *, special: bool = False
    ) -> str:
        """Token ids to text; ``special``: special tokens (a chat template's markers) as
        their text (llama.cpp backend) rather than as nothing."""
        async with self._use(model_id) as worker:
            return await worker.text.detokenize(tokens, special)

    async def apply_chat_template(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Render ``messages`` with the model's chat template; returns token ids ready for
        :meth:`infer`. NotSupported when the backend has no chat template."""
        async with self._use(model_id) as worker:
            return await worker.text.apply_chat_template(
                messages, system, tools, add_generation_prompt
            )

    async def embed(self, model_id: str, prompt: str | Sequence[int]) -> list[float]:
        """A pooled embedding vector. NotSupported when the backend has none."""
        async with self._use(model_id) as worker:
            return await worker.text.embed(prompt)

    # ---- adapters ---------------------------------------------------------------------------

    async def load_adapter(self, model_id: str, path: str) -> int:
        """Attach a LoRA adapter at scale 1.0; returns its handle. Waits until no request of
        the model is running; requests queued later use the new adapter set."""
        return await self._worker(model_id).adapters.load_adapter(str(path))

    async def unload_adapter(self, model_id: str, handle: int) -> None:
        """Detach an adapter (idempotent for unknown handles)."""
        await self._worker(model_id).adapters.unload_adapter(handle)

    async def set_adapter_scale(self, model_id: str, handle: int, scale: float) -> None:
        await self._worker(model_id).adapters.set_adapter_scale(handle, scale)

    def list_adapters(self, model_id: str) -> list[AdapterInfo]:
        return list(self._worker(model_id).adapters.list_adapters())

    # ---- routing queries ----------------------------------------------------------------------

    async def longest_cached_prefix(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        *,
        add_special: bool = True,
        cache_salt: str | None = None,
    ) -> CachedPrefix:
        """How many leading tokens of ``prompt`` a request would not prefill on this model
        now, and from where (a cache tier, or a sequence's live KV); with ``cache_salt``,
        what a request with that salt would find. Loads nothing and counts no hit: for
        routers placing requests."""
        worker = self._worker(model_id)
        salt = intake.check_cache_salt(cache_salt)
        if intake.prompt_kind(prompt) == "text":
            tokens = await self.tokenize(model_id, prompt, add_special=add_special)  # type: ignore[arg-type]
        else:
            tokens = intake.check_token_ids(prompt, worker.n_vocab(), "prompt")  # type: ignore[arg-type]
        return worker.cached_prefix(tokens, salt)

    async def explain_prefix(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        *,
        add_special: bool = True,
        cache_salt: str | None = None,
    ) -> CacheExplanation:
        """Why a request for ``prompt`` would (not) be warm on this model now: what it would
        restore and from where, where the prompt leaves the nearest cached row and why
        (the ``Stats.cache_explain`` a request would get; docs/caching.md, "Why did it
        miss?"). Loads nothing, counts no hit, runs nothing."""
        worker = self._worker(model_id)
        salt = intake.check_cache_salt(cache_salt)
        if intake.prompt_kind(prompt) == "text":
            tokens = await self.tokenize(model_id, prompt, add_special=add_special)  # type: ignore[arg-type]
        else:
            tokens = intake.check_token_ids(prompt, worker.n_vocab(), "prompt")  # type: ignore[arg-type]
        if not tokens:
            raise InvalidRequest("prompt", "is empty")
        return await worker.explain_prefix(tokens, salt)

    def list_cached_prefixes(self, model_id: str) -> list[CachedPrefix]:
        """Every cache row of the model under its current adapter set, newest first."""
        return self._worker(model_id).cached_prefixes()

    def prefix_summary(
        self, model_id: str, *, block: int = BLOCK, limit: int = 65_536
    ) -> PrefixSummary:
        """Every whole-block token prefix the model holds (cache rows and live KV), as
        chain hashes with their tier: what a replica reports so that a router can match a
        prompt's prefix exactly without seeing any tokens (see ``erllama.cluster``)."""
        if block < 1 or limit < 1:
            raise InvalidRequest("block" if block < 1 else "limit", "must be >= 1")
        return self._worker(model_id).prefix_summary(block, limit)

    def queue_depth(self, model_id: str | None = None) -> int:
        """Requests queued or running, on one model or on all of them."""
        workers = [self._worker(model_id)] if model_id is not None else self._models.values()
        return sum(w.load for w in workers if w.state in ("idle", "failed"))

    async def vram_info(self) -> list[DeviceMemory]:
        """Memory of each visible NVIDIA GPU (through nvidia-smi); empty without one."""
        return await gpu_memory()

    # ---- moving cache rows between engines ------------------------------------------------------

    async def export_row(self, key: str | bytes) -> bytes | None:
        """A cache row (by its hex key, a ``finish_key`` say) as self-validating bytes for
        another engine's :meth:`import_row`; None when this engine does not hold it."""
        parsed = intake.parse_parent_key(key)
        if parsed is None or self._kv is None:
            return None
        return await self._kv.export_row(parsed)

    async def export_prefix(self, model_id: str, prompt: Sequence[int]) -> bytes | None:
        """The cache row a request for ``prompt`` (token ids) would restore here (the
        longest cached prefix), exported as by :meth:`export_row`; None when no cache row
        holds one (a sequence's live KV is not a row). For another engine that lacks it."""
        worker = self._worker(model_id)
        tokens = intake.check_token_ids(prompt, worker.n_vocab(), "prompt")
        found = worker.cached_prefix(tokens)
        if found.key is None or self._kv is None:
            return None  # nothing, or only a sequence's live KV (not a row)
        return await self._kv.export_row(bytes.fromhex(found.key))

    async def import_row(self, data: bytes | bytearray | memoryview) -> str:
        """Take a row another engine exported: it is validated exactly as a row file read
        from disk (checksums, lengths, the key recomputed from its tokens), then saved
        here. Returns its key (hex). CacheError if it is damaged or nothing has room."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequest("data", f"must be bytes, not {type(data).__name__}")
        if self._kv is None:
            raise CacheError("import", "the cache is off")
        return (await self._kv.import_row(data)).hex()

    # ---- operator calls -----------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Set the cache's tallies back to zero (byte and row totals stay current)."""
        if self._kv is not None:
            self._kv.reset_counters()

    def gc(self) -> int:
        """Drop every cache row not being read or written; returns how many."""
        return self._kv.gc() if self._kv is not None else 0

    def evict_bytes(
        self, n_bytes: int, tiers: Sequence[str] = ("ram", "ram_file", "disk")
    ) -> tuple[int, int]:
        """Free at least ``n_bytes`` of cache rows from ``tiers`` (in order), least recently
        used first; returns (rows, bytes) freed."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise InvalidRequest("n_bytes", f"must be an integer >= 0, got {n_bytes!r}")
        if isinstance(tiers, str) or not all(t in CACHE_TIERS for t in tiers):
            raise InvalidRequest(
                "tiers", f"must be a sequence of tier names from {CACHE_TIERS}, got {tiers!r}"
            )
        if self._kv is None:
            return 0, 0
        return self._kv.evict_bytes(n_bytes, tiers)

    async def save_all(self, model_id: str) -> int:
        """Save every sequence of the model that holds state (running requests, sessions,
        idle sequences' live KV) with reason ``evict``; returns how many sequences' states
        the cache now holds (a row it held already is not written again)."""
        return await self._worker(model_id).ops.save_all()

    # ---- observability ----------------------------------------------------------------------

    def cache_counters(self) -> CacheCounters:
        """Hits, misses, saves per reason, drops, evictions, spills, corrupt files, bytes
        and rows per tier, and time spent packing, loading and looking up."""
        if self._kv is not None:
            return self._kv.snapshot()
        return CacheCounters()

    def cache_row(self, key: str | bytes) -> CachedRow | None:
        """One cache row by its key (a ``finish_key``, or a key ``list_cached_prefixes``
        gave), or None when the cache does not hold it."""
        parsed = intake.parse_parent_key(key)
        if parsed is None or self._kv is None:
            return None
        row = self._kv.catalog.get(parsed)
        return None if row is None else _row_info(row)

    def cache_rows(self) -> list[CachedRow]:
        """Every row the cache holds, every model's, oldest first."""
        if self._kv is None:
            return []
        return [_row_info(row) for row in list(self._kv.catalog.rows.values())]

    async def sweep_cache(self) -> None:
        """Run the cache's sweeper now (it also runs periodically): adopt valid rows other
        processes published into the file tiers, delete stale temporary files and expired
        reservations, forget rows deleted behind the cache's back."""
        if self._kv is not None:
            await self._kv.sweep()

    async def wait_saved(self) -> None:
        """Wait until every save handed to the cache so far is written (or dropped). For
        tests and tools that read the cache's files right after a request."""
        if self._kv is not None:
            await self._kv.drain()

    def in_flight(self) -> list[str]:
        """Refs of every request queued or running, on every model."""
        return list(self._inflight)

    def pressure_status(self) -> PressureStatus:
        """The memory-pressure scheduler: settings, last reading and ratio, last round and
        the last one that freed anything (what, when), and counters. Never waits."""
        return self._pressure.status()

    async def force_check(self) -> PressureResult:
        """Run one pressure round now (after any round in progress) and return what it did:
        ``outcome`` is ``freed`` or why it skipped (``disabled``, ``below_watermark``,
        ``nothing_to_evict``, ``unavailable``, ``failed``). Never raises for a failing source."""
        return await self._pressure.check()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def _aclose(self) -> None:
        self._closed = True
        self._pressure.stop()
        self._lifecycle.stop()
        async with anyio.create_task_group() as tg:
            for worker in list(self._models.values()):
                if worker.state != "loading":
                    # The engine ends whatever runs: past the wait, the thread leaves a
                    # model still in use by a native call allocated rather than free it.
                    tg.start_soon(functools.partial(worker.close, force=True))
        self._models.clear()


class _Use:
    """The engine's own hold on a model for one call (a class, not a generator: it is on
    every request's path)."""

    __slots__ = ("_held", "_lifecycle", "_model_id")

    def __init__(self, lifecycle: Lifecycle, model_id: str) -> None:
        self._lifecycle = lifecycle
        self._model_id = model_id
        self._held: Hold | None = None

    async def __aenter__(self) -> ModelWorker:
        held = self._lifecycle.hold_now(self._model_id)
        if held is None:
            held = await self._lifecycle.acquire(self._model_id, KeepAlive.UNCHANGED, None)
        self._held = held
        return held.worker

    async def __aexit__(self, *exc_info: object) -> None:
        if self._held is not None:
            self._lifecycle.release(self._held)
            self._held = None


class _PressureModels:
    """The engine's models as the pressure scheduler sees them (its ``ModelPool``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def is_idle(self, model_id: str) -> bool:
        # Nothing admitted or queued, no adapter change waiting, no native call or intake
        # in flight (see erllama.model.gate), and no hold (erllama.lifecycle).
        return self._engine._lifecycle.is_idle(model_id, adapters_ok=True)

    def unload_candidates(self) -> list[str]:
        return self._engine._lifecycle.idle_by_age(adapters_ok=True)

    async def evict(self, model_id: str) -> int:
        return await self._engine.evict(model_id)

    async def unload(self, model_id: str) -> None:
        # No await before the worker marks itself closing: the caller's idle check holds.
        # The model stays known: its next use loads it again.
        await self._engine._lifecycle.unload_worker(model_id, "pressure")


@asynccontextmanager
async def open_engine(
    config: EngineConfig | Mapping[str, Any] | str | None = None,
    *,
    backends: BackendRegistry | None = None,
    pressure_sources: PressureSourceRegistry | None = None,
    drafters: DrafterRegistry | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine; leaving the block ends every request, saves and unloads every model.

    ``config`` is an :class:`EngineConfig`, a mapping, or a path to a TOML file. ``backends``,
    ``pressure_sources`` and ``drafters`` replace the entry-point registries (tests pass
    fresh ones).
    With ``config.pressure.enabled``, an unknown ``pressure.source`` raises ConfigError here.
    """
    if config is None:
        config = EngineConfig()
    elif not isinstance(config, EngineConfig):
        config = load_config(config)
    registry = backends if backends is not None else make_backend_registry()
    source = None
    if config.pressure.enabled:
        sources = pressure_sources if pressure_sources is not None else make_pressure_registry()
        source = sources.get(config.pressure.source)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            kv: KVCache | None = None
            engine: Engine | None = None
            try:
                if config.cache.enabled:
                    kv = KVCache(config.cache)
                    await kv.start(tg)
                engine = Engine(config, tg, registry, kv, source, drafters)
                for model_id, model_config in config.models.items():
                    engine._backends.get(model_config.backend)  # ConfigError at open
                    engine._lifecycle.register(model_id, model_config, configured=True)
                await tg.start(engine._lifecycle.run)
                preload = config.preload if config.preload is not None else config.models
                for model_id in dict.fromkeys(preload):
                    await engine.load_model(model_id, config.models[model_id])
                if config.pressure.enabled:
                    await tg.start(engine._pressure.run)
                yield engine
            except anyio.get_cancelled_exc_class():
                raise  # belongs to the scope that cancelled: it must pass through
            except BaseException as exc:
                # Re-raised below, outside the task group, so callers see their own
                # exception (SystemExit, KeyboardInterrupt, a start-up CacheError ...) rather
                # than an exception group around it.
                body_error = exc
            finally:
                with anyio.move_on_after(SHUTDOWN_TIMEOUT_S, shield=True) as scope:
                    if engine is not None:
                        await engine._aclose()
                    if kv is not None:
                        await kv.close()
                if scope.cancelled_caught:
                    log.error("engine shutdown timed out after %.0f s", SHUTDOWN_TIMEOUT_S)
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Ctrl-C on trio lands in whichever task runs at that moment, an engine task
        # included: the user gets their KeyboardInterrupt (or SystemExit), not the group.
        interrupt = _first_interrupt(group)
        if interrupt is None:
            raise
        raise interrupt from None
    if body_error is not None:
        raise body_error


def _model_config(config: ModelConfig | Mapping[str, Any] | None) -> ModelConfig:
    if config is None:
        raise ConfigError([("config", "load_model needs a ModelConfig")])
    if isinstance(config, Mapping):
        config = structure_config(config, ModelConfig)
    if not isinstance(config, ModelConfig):
        raise ConfigError(
            [("config", f"must be a ModelConfig or a mapping, not {type(config).__name__}")]
        )
    return config


def _row_info(row: Row) -> CachedRow:
    return CachedRow(
        key=row.key.hex(),
        tokens=decode_tokens(row.token_bytes),
        tier=row.tier,
        status=row.status,
        size=row.size,
        reason=row.reason,
        hits=row.hits,
    )


def _first_interrupt(group: BaseExceptionGroup) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_interrupt(exc)
            if found is not None:
                return found
        elif isinstance(exc, KeyboardInterrupt | SystemExit):
            return exc
    return None
