"""One erllama engine as a Ray Serve replica.

The replica owns an engine with cache directories of its own (``replica-<rank>`` under the
configured ones, so a restarted replica finds its disk rows again), reports what it holds
to the routers (:meth:`Replica.record_routing_stats`), serves generation as a stream of
erllama events, and hands rows to, or fetches rows from, the other replicas
(``transfer.py``). Methods that can fail with an erllama error return it as a
:class:`~erllama.ray.wire.Failed` value instead of raising it through Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import ray
from ray import serve

from ..cluster import BLOCK
from ..config import EngineConfig
from ..engine import Engine, open_engine
from ..errors import ErllamaError
from ..events import Done, Token
from ._owner import Owner
from .fleet import every_model_loaded
from .transfer import TransferPolicy
from .wire import (
    Accepted,
    Description,
    EmbedRequest,
    ExportRequest,
    Failed,
    GenerateRequest,
    LoadRequest,
    Pin,
    UnloadRequest,
)

__all__ = ["Replica", "ReplicaSettings", "replica_engine_config"]

log = logging.getLogger("erllama.ray.replica")

#: Sessions a replica reports per model (the router keeps its own memory beyond these).
MAX_REPORTED_SESSIONS = 1024
#: The least time a fetch gets before it is abandoned (and the prompt prefilled).
MIN_FETCH_DEADLINE_S = 2.0
#: How often a replica asked for a row it is still prefilling looks for it.
ROW_POLL_S = 0.02


@attrs.frozen(kw_only=True)
class ReplicaSettings:
    """What every replica is built from (pickled to each one by Ray)."""

    engine: EngineConfig
    #: Chain hashes a replica reports per model (most recently used first when capped):
    #: 4,096 hashes are 32 KiB and cover 262,144 tokens of distinct prefixes.
    summary_limit: int = 4096
    block: int = BLOCK
    #: Fetch rows from other replicas when that beats prefilling (``transfer.py``).
    transfer: bool = True
    #: Each model's transfer policy starts from this (and learns from then on).
    policy: TransferPolicy = attrs.Factory(TransferPolicy)


def replica_engine_config(config: EngineConfig, name: str) -> EngineConfig:
    """``config`` with each cache directory replaced by a folder ``name`` inside it, and
    without the model lifecycle (see :func:`erllama.ray.fleet.every_model_loaded`)."""
    cache = config.cache
    ram_file = cache.ram_file_dir
    disk = cache.disk_dir
    cache = attrs.evolve(
        cache,
        ram_file_dir=None if ram_file is None else Path(ram_file) / name,
        disk_dir=None if disk is None else Path(disk) / name,
    )
    return every_model_loaded(attrs.evolve(config, cache=cache))


class Replica:
    """The deployment class (``app.py`` wraps it in ``serve.deployment``)."""

    async def __init__(self, settings: ReplicaSettings) -> None:  # type: ignore[misc]
        context = serve.get_replica_context()
        self.id: str = context.replica_id.unique_id
        self._app = context.app_name
        self._deployment = context.deployment
        self.settings = settings
        #: Per model: prefill rates and row sizes differ from model to model.
        self.policies: dict[str, TransferPolicy] = {}
        config = replica_engine_config(settings.engine, f"replica-{context.rank.rank}")
        self._owner: Owner[Engine] = Owner(lambda: open_engine(config))
        self.engine = await self._owner.start()
        self._peers: Any = None  # a handle to this deployment, made on first fetch
        #: Requests here before their first token: (model, prompt) by a key of their own.
        self._prefilling: dict[object, tuple[str, tuple[int, ...]]] = {}

    async def __del__(self) -> None:
        await self._owner.stop()

    def check_health(self) -> None:
        if not self._owner.alive:
            raise RuntimeError("the replica's engine has closed")

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[object]:
        """:class:`Accepted`, then the request's events (ending with ``Done``), or a
        :class:`Failed`. A consumer that goes away cancels the request in the model."""
        # Until its first token the request is on its way to prefilling (fetching, queued,
        # prefilling): a replica that asks for a row of this prompt meanwhile may wait for
        # the row its prefill saves.
        key = object()
        self._prefilling[key] = (request.model, request.tokens)
        try:
            try:
                fetched = await self._maybe_fetch(request)
                stream = await self.engine.infer(
                    request.model, list(request.tokens), **request.options
                )
            except ErllamaError as exc:
                yield Failed.of(exc)
                return
            async with stream:
                yield Accepted(self.id, fetched)
                try:
                    async for event in stream:
                        if isinstance(event, Token | Done):
                            self._prefilling.pop(key, None)
                        if isinstance(event, Done):
                            self._learn(request.model, event)
                        yield event
                except ErllamaError as exc:
                    yield Failed.of(exc)
        finally:
            self._prefilling.pop(key, None)

    def policy(self, model: str) -> TransferPolicy:
        """The model's transfer policy (made from the settings' on first use)."""
        policy = self.policies.get(model)
        if policy is None:
            policy = self.policies[model] = attrs.evolve(self.settings.policy)
        return policy

    def _learn(self, model: str, done: Done) -> None:
        st = done.stats
        self.policy(model).prefilled(st.prompt_tokens - st.cache_delta.read, st.prefill_s)

    async def _maybe_fetch(self, request: GenerateRequest) -> int:
        """Fetch the longest prefix another replica holds when that beats prefilling it;
        how many tokens the imported row holds (0: nothing fetched). Never fails the
        request: a transfer that fails or takes too long is abandoned."""
        if not self.settings.transfer or not (request.holders or request.filling):
            return 0
        own = (await self.engine.longest_cached_prefix(request.model, list(request.tokens))).tokens
        policy = self.policy(request.model)
        export: ExportRequest | None = None
        best = policy.best_holder(request.holders, self.id, own)
        if best is not None:
            holder, tokens = best
            export = ExportRequest(request.model, request.tokens, pin=holder)
        # A replica still prefilling a longer prefix: wait for its row when that should
        # save more than fetching a row that exists now.
        filling = policy.best_filling(request.filling, self.id, own)
        if filling is not None and (best is None or filling[3] > policy.saving_s(own, best[1])):
            holder, tokens, wait_s, _ = filling
            export = ExportRequest(
                request.model,
                request.tokens,
                pin=holder,
                min_tokens=own + policy.min_tokens,
                wait_s=wait_s,
            )
        if export is None:
            return 0
        # Past the prefill it saves a fetch is not worth waiting for; the floor covers the
        # first fetch, which also sets up this replica's handle to the others.
        deadline = max(policy.prefill_s(tokens - own), MIN_FETCH_DEADLINE_S)
        started = time.monotonic()
        blob: bytes | None = None
        with anyio.move_on_after(deadline):
            try:
                blob = await self._fetch(export)
            except Exception:
                log.warning("fetching a row from replica %s failed", holder, exc_info=True)
        if blob is None:
            policy.failures += 1
            return 0
        seconds = time.monotonic() - started
        try:
            key = await self.engine.import_row(blob)
        except ErllamaError:
            log.warning("the row replica %s sent was refused", holder, exc_info=True)
            policy.failures += 1
            return 0
        moved = next(
            (p.tokens for p in self.engine.list_cached_prefixes(request.model) if p.key == key),
            tokens,
        )
        policy.moved(len(blob), moved, seconds)
        return moved

    async def _fetch(self, request: ExportRequest) -> bytes | None:
        if self._peers is None:
            self._peers = serve.get_deployment_handle(self._deployment, app_name=self._app)
        response = self._peers.options(method_name="export_prefix").remote(request)
        try:
            refs = await response
        except BaseException:
            response.cancel()
            raise
        if not refs:
            return None
        blob = await refs[0]
        return bytes(blob) if blob is not None else None

    async def export_prefix(self, request: ExportRequest) -> list[Any] | None:
        """The row holding the longest prefix of the request's tokens, put in the object
        store (wrapped in a list: Ray resolves a returned top-level reference)."""
        try:
            if request.wait_s > 0:
                await self._await_row(request)
            blob = await self.engine.export_prefix(request.model, list(request.tokens))
        except ErllamaError:
            return None
        if blob is None:
            return None
        return [ray.put(blob)]

    async def _await_row(self, request: ExportRequest) -> None:
        """Until this replica holds a row of at least ``request.min_tokens`` of the prompt,
        while a request here that shares that much of it is still prefilling (it saves a
        row on the way), for at most ``wait_s``. Nothing here will save it: return at once."""
        tokens = list(request.tokens)
        with anyio.move_on_after(request.wait_s):
            while True:
                found = await self.engine.longest_cached_prefix(request.model, tokens)
                if found.tier not in (None, "live") and found.tokens >= request.min_tokens:
                    return
                if not self._is_prefilling(request.model, request.tokens, request.min_tokens):
                    return
                await anyio.sleep(ROW_POLL_S)

    def _is_prefilling(self, model: str, tokens: tuple[int, ...], n: int) -> bool:
        """A request here before its first token shares the first ``n`` of ``tokens``."""
        head = tokens[:n]
        return len(head) == n and any(
            m == model and prompt[:n] == head for m, prompt in self._prefilling.values()
        )

    # ---- what the routers and the ingress see ----------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        """The prefixes this replica holds per model (chain hashes by tier), its sessions
        and its load. Small, and without timestamps: Serve re-broadcasts it to every router
        whenever it changes."""
        models: dict[str, Any] = {}
        held_tokens: dict[str, int] = {}
        for info in self.engine.list_models():
            if info.status in ("loading", "failed"):
                continue
            try:
                summary = self.engine.prefix_summary(
                    info.id, block=self.settings.block, limit=self.settings.summary_limit
                )
                rows = self.engine.list_cached_prefixes(info.id)
            except ErllamaError:
                continue
            entry = summary.to_wire()
            sessions = sorted(s.id for s in info.sessions)[:MAX_REPORTED_SESSIONS]
            if sessions:
                entry["sessions"] = sessions
            models[info.id] = entry
            held_tokens[info.id] = sum(r.tokens for r in rows)
        # The cache counts bytes for all models together: each model's policy gets the
        # average (exact with one model, which is the usual case).
        counters = self.engine.cache_counters()
        held_bytes = counters.bytes_ram + counters.bytes_ram_file + counters.bytes_disk
        for model in held_tokens:
            self.policy(model).rows_held(held_bytes, sum(held_tokens.values()))
        return {"replica": self.id, "load": self.engine.queue_depth(), "models": models}

    def describe(self, request: Pin | None = None) -> Description:
        return Description(
            replica=self.id,
            models=tuple(self.engine.list_models()),
            counters=self.engine.cache_counters(),
            pressure=self.engine.pressure_status(),
        )

    def transfer_stats(self, request: Pin | None = None) -> dict[str, Any]:
        """Rows fetched and fetches abandoned, in all and per model with each model's
        current estimates (for operators and tests)."""
        policies = self.policies.values()
        return {
            "transfers": sum(p.transfers for p in policies),
            "failures": sum(p.failures for p in policies),
            "models": {
                model: {
                    "transfers": p.transfers,
                    "failures": p.failures,
                    "bandwidth_bytes_per_s": p.bandwidth_bytes_per_s,
                    "bytes_per_token": p.bytes_per_token,
                    "prefill_tok_per_s": p.prefill_tok_per_s,
                }
                for model, p in self.policies.items()
            },
        }

    # ---- the rest of what the server asks of an engine --------------------------------------

    async def embed(self, request: EmbedRequest) -> list[float] | Failed:
        try:
            return await self.engine.embed(request.model, list(request.tokens))
        except ErllamaError as exc:
            return Failed.of(exc)

    async def load_model(self, request: LoadRequest) -> str | Failed:
        try:
            return await self.engine.load_model(request.model_id, request.config)
        except ErllamaError as exc:
            return Failed.of(exc)

    async def unload(self, request: UnloadRequest) -> bool | Failed:
        try:
            await self.engine.unload(request.model_id)
        except ErllamaError as exc:
            return Failed.of(exc)
        return True

    def gc(self, request: Pin | None = None) -> int:
        """Drop every cache row not in use (an operator's call; tests use it to evict)."""
        return self.engine.gc()
