"""The engine the ingress serves: erllama's server calls (``EnginePort``) over a fleet of
replicas reached through a Serve ``DeploymentHandle``.

* Text work (chat templates, tokenizing, detokenizing) runs on a local engine holding the
  same models, so each prompt is tokenized once, with the model's own tokenizer, and the
  replicas and the router see exactly those token ids.
* Generation goes to the replica the router picks, as a stream; the first item says the
  replica queued the request or carries its typed error, so a full queue or a bad argument
  is raised by :meth:`FleetEngine.infer` itself, before any response begins, as in
  ``erllama serve``. Leaving the stream early cancels the request on the replica.
* What the server reads without waiting (models, queue depths, cache counters) comes from
  a view of the fleet refreshed every ``refresh_s`` by a broadcast to every replica, and
  right after an admin load or unload.

A failure of Ray itself (a replica died, the deployment is gone) is a ``BackendError``
(503); Serve's back-pressure is ``QueueFull`` (429).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from types import TracebackType
from typing import Any, Unpack

import anyio
import attrs

from ..cache.counters import CacheCounters
from ..cluster import BLOCK, chain_hashes
from ..config import EngineConfig, ModelConfig, structure_config
from ..engine import Engine, open_engine
from ..errors import (
    BackendError,
    ConfigError,
    ErllamaError,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
)
from ..events import Done, Event, LifecycleState, ModelInfo, ModelState
from ..lifecycle import KeepAlive
from ..options import RequestOptions
from ..pressure import PressureStatus
from .wire import (
    Accepted,
    Description,
    EmbedRequest,
    Failed,
    GenerateRequest,
    LoadRequest,
    UnloadRequest,
    unwrap,
)

__all__ = ["FleetEngine", "RemoteStream", "open_fleet", "tokenizer_config"]

log = logging.getLogger("erllama.ray.fleet")

#: How long a broadcast to every replica may take before the view keeps its old state.
BROADCAST_TIMEOUT_S = 10.0
#: How long opening the fleet waits for a first replica to answer.
READY_TIMEOUT_S = 60.0


def foreign_error(exc: BaseException, model_id: str, operation: str) -> ErllamaError:
    """A Ray failure as the erllama error the server maps to a status."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, ErllamaError):
        return exc
    if isinstance(exc, BackPressureError):
        return QueueFull(model_id, int(getattr(exc, "max_queued_requests", 0) or 0))
    return BackendError("ray", operation, f"{type(exc).__name__}: {exc}")


class RemoteStream:
    """One request's events from a replica (``EventStream``)."""

    def __init__(self, generator: Any, model_id: str, accepted: Accepted) -> None:
        self._gen = generator
        self.model_id = model_id
        self.accepted = accepted
        self.done: Done | None = None
        self._ended = False

    @property
    def replica(self) -> str:
        """The replica serving it."""
        return self.accepted.replica

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._gen.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise BackendError("ray", "generate", "the replica ended the stream early") from None
        except ErllamaError:
            self._ended = True
            raise
        except Exception as exc:
            self._ended = True
            raise foreign_error(exc, self.model_id, "generate") from exc
        if isinstance(item, Failed):
            self._ended = True
            raise item.error()
        if isinstance(item, Done):
            self._ended = True
            self.done = item
        event: Event = item
        return event

    async def aclose(self) -> None:
        """Stop reading: cancels the request on its replica if it has not ended."""
        if not self._ended:
            self._ended = True
            self._gen.cancel()

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _merge(a: ModelInfo, b: ModelInfo) -> ModelInfo:
    """One model's info over two replicas: queues add up; a failure or a load shows."""
    status = a.status
    for worse in ("failed", "loading", "unloading"):
        if worse in (a.status, b.status):
            status = worse
            break
    return attrs.evolve(
        a,
        status=status,
        queue_len=a.queue_len + b.queue_len,
        running=a.running + b.running,
        sessions=a.sessions + b.sessions,
        last_used=max(a.last_used, b.last_used),
        error=a.error or b.error,
    )


def _sum_counters(counters: Sequence[CacheCounters]) -> CacheCounters:
    if not counters:
        return CacheCounters()
    totals = {
        f.name: sum(getattr(c, f.name) for c in counters)
        for f in attrs.fields(CacheCounters)
        if isinstance(getattr(counters[0], f.name), int | float)
    }
    return CacheCounters(**totals)


def every_model_loaded(config: EngineConfig) -> EngineConfig:
    """``config`` without the model lifecycle: a fleet loads every model on every replica
    at start and keeps it (no ``preload``, ``max_loaded_models`` or ``keep_alive_s``): the
    router places requests on the replicas that list a model, and loads nothing on
    demand."""
    return attrs.evolve(
        config,
        preload=None,
        max_loaded_models=None,
        models={k: attrs.evolve(m, keep_alive_s=None) for k, m in config.models.items()},
    )


def tokenizer_config(config: EngineConfig) -> EngineConfig:
    """The ingress's own engine: the same models for text work only (no cache, one
    sequence each, no memory-pressure rounds, every model loaded)."""
    from ..config import CacheConfig, PressureConfig

    return every_model_loaded(
        attrs.evolve(
            config,
            cache=CacheConfig(enabled=False, ram_file_dir=None),
            pressure=PressureConfig(),
            models={k: _tokenizer_model(m) for k, m in config.models.items()},
        )
    )


def _tokenizer_model(config: ModelConfig) -> ModelConfig:
    # llama.cpp cannot load only the vocabulary through erllama yet (docs/scale-out.md), so
    # the ingress loads the model with the smallest context that still works.
    return attrs.evolve(config, n_seq_max=1, n_ctx=min(config.n_ctx, 512), n_gpu_layers=0)


class FleetEngine:
    """``EnginePort`` over the replicas (see the module docstring)."""

    def __init__(self, handle: Any, local: Engine, *, block: int = BLOCK) -> None:
        self._handle = handle
        self._local = local
        self.block = block
        self._view: dict[str, Description] = {}

    # ---- the fleet view ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask every replica for its models and counters."""
        try:
            results = await self._handle.broadcast("describe").results_async(
                timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
            )
        except Exception:
            log.warning("could not describe the replicas", exc_info=True)
            return
        self._view = {d.replica: d for d in results if isinstance(d, Description)}

    @property
    def replicas(self) -> list[str]:
        """The replicas in the last view."""
        return list(self._view)

    def list_models(self) -> list[ModelInfo]:
        merged: dict[str, ModelInfo] = {}
        for description in self._view.values():
            for info in description.models:
                prev = merged.get(info.id)
                merged[info.id] = info if prev is None else _merge(prev, info)
        return list(merged.values())

    def model_info(self, model_id: str) -> ModelInfo:
        for info in self.list_models():
            if info.id == model_id:
                return info
        raise ModelNotFound(model_id)

    def model_states(self) -> list[ModelState]:
        """The fleet's models as the replicas last described them: every model listed is
        loaded (replicas load every configured model at start and nothing on demand)."""
        states: dict[str, LifecycleState] = {
            "loading": "loading", "unloading": "unloading", "failed": "failed"
        }  # fmt: skip
        return [
            ModelState(
                id=info.id,
                state=states.get(info.status, "loaded"),
                keep_alive_s=None,
                last_used_at=None,
                expires_at=None,
                loaded_at=None,
                configured=True,
                holds=0,
                loads=1,
                info=info,
            )
            for info in self.list_models()
        ]

    def hold(
        self,
        model_id: str,
        *,
        keep_alive_s: float | KeepAlive | None = KeepAlive.DEFAULT,
        wait_s: float | None = None,
    ) -> AbstractAsyncContextManager[ModelInfo]:
        """The model as the fleet sees it (ModelNotFound when no replica lists it); the
        fleet loads nothing on demand and applies no keep-alive."""
        return self._hold(model_id)

    @asynccontextmanager
    async def _hold(self, model_id: str) -> AsyncIterator[ModelInfo]:
        yield self.model_info(model_id)

    def cache_counters(self) -> CacheCounters:
        return _sum_counters([d.counters for d in self._view.values()])

    def pressure_status(self) -> PressureStatus:
        statuses = [d.pressure for d in self._view.values()]
        if not statuses:
            return self._local.pressure_status()
        return attrs.evolve(
            statuses[0],
            rounds=sum(s.rounds for s in statuses),
            evicted_rows=sum(s.evicted_rows for s in statuses),
            evicted_bytes=sum(s.evicted_bytes for s in statuses),
            unloaded_models=sum(s.unloaded_models for s in statuses),
            unavailable_samples=sum(s.unavailable_samples for s in statuses),
            failed_rounds=sum(s.failed_rounds for s in statuses),
        )

    # ---- generation -------------------------------------------------------------------------

    async def infer(
        self, model_id: str, prompt: str | Sequence[int], **options: Unpack[RequestOptions]
    ) -> RemoteStream:
        kw: dict[str, Any] = dict(options)
        add_special = kw.pop("add_special", True)
        if isinstance(prompt, str):
            try:
                tokens = await self._local.tokenize(model_id, prompt, add_special=add_special)
            except InvalidRequest as exc:  # named as Engine.infer names it
                raise InvalidRequest("prompt", exc.reason) from None
        else:
            tokens = list(prompt)
        try:
            chain = tuple(chain_hashes(tokens, self.block))
        except (TypeError, ValueError, OverflowError):
            chain = ()  # not token ids: the replica refuses them, naming the parameter
        session = kw.get("session_id")
        request = GenerateRequest(
            model=model_id,
            tokens=tuple(tokens),
            options=kw,
            chain=chain,
            session_id=session if isinstance(session, str) else None,
        )
        return await self.generate(request)

    async def generate(self, request: GenerateRequest) -> RemoteStream:
        """Send a request as it is (a ``pin`` included) and wait until a replica queued it."""
        generator = self._handle.options(stream=True, method_name="generate").remote(request)
        try:
            first = await generator.__anext__()
        except StopAsyncIteration:
            raise BackendError("ray", "generate", "the replica sent nothing") from None
        except Exception as exc:
            raise foreign_error(exc, request.model, "generate") from exc
        except BaseException:
            generator.cancel()
            raise
        if isinstance(first, Failed):
            raise first.error()
        if not isinstance(first, Accepted):
            generator.cancel()
            raise BackendError("ray", "generate", f"unexpected first item {type(first).__name__}")
        return RemoteStream(generator, request.model, first)

    # ---- text, on the local engine -----------------------------------------------------------

    async def apply_chat_template(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        return await self._local.apply_chat_template(
            model_id, messages, system, tools, add_generation_prompt=add_generation_prompt
        )

    async def tokenize(
        self, model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return await self._local.tokenize(
            model_id, text, add_special=add_special, parse_special=parse_special
        )

    async def detokenize(
        self, model_id: str, tokens: Sequence[int], *, special: bool = False
    ) -> str:
        return await self._local.detokenize(model_id, tokens, special=special)

    async def embed(self, model_id: str, prompt: str | Sequence[int]) -> list[float]:
        tokens = await self._local.tokenize(model_id, prompt) if isinstance(prompt, str) else prompt
        request = EmbedRequest(model_id, tuple(tokens))
        try:
            result = await self._handle.options(method_name="embed").remote(request)
        except Exception as exc:
            raise foreign_error(exc, model_id, "embed") from exc
        vector: list[float] = unwrap(result)
        return vector

    # ---- loading, on every replica -----------------------------------------------------------

    async def load_model(
        self,
        model_id: str | ModelConfig | None = None,
        config: ModelConfig | Mapping[str, Any] | None = None,
    ) -> str:
        """Load on every replica and locally (for text work); all or nothing."""
        if isinstance(model_id, ModelConfig) and config is None:
            model_id, config = None, model_id
        if isinstance(config, Mapping):
            config = structure_config(config, ModelConfig)
        if not isinstance(model_id, str) or not isinstance(config, ModelConfig):
            raise ConfigError([("model_id", "the fleet loads a model by id and ModelConfig")])
        config = attrs.evolve(config, keep_alive_s=None)  # a fleet keeps what it loads
        await self._local.load_model(model_id, _tokenizer_model(config))
        try:
            results = await self._broadcast("load_model", LoadRequest(model_id, config))
            failures = [r for r in results if isinstance(r, Failed | BaseException)]
            if failures:
                await self._broadcast("unload", UnloadRequest(model_id))
                first = failures[0]
                if isinstance(first, Failed):
                    raise first.error()
                raise foreign_error(first, model_id, "load")
        except BaseException:
            await self._local.unload(model_id)
            raise
        finally:
            await self.refresh()
        return model_id

    async def unload(self, model_id: str) -> None:
        """Unload on every replica and locally."""
        try:
            results = await self._broadcast("unload", UnloadRequest(model_id))
        finally:
            await self.refresh()
        with suppress(ModelNotFound):
            await self._local.unload(model_id)
        failures = [r for r in results if isinstance(r, Failed)]
        if failures and len(failures) == len(results):
            raise failures[0].error()

    async def _broadcast(self, method: str, request: object) -> list[Any]:
        try:
            results: list[Any] = await self._handle.broadcast(method, request).results_async(
                timeout_s=BROADCAST_TIMEOUT_S * 6, return_exceptions=True
            )
        except Exception as exc:
            raise foreign_error(exc, getattr(request, "model_id", ""), method) from exc
        return results


@asynccontextmanager
async def open_fleet(
    handle: Any, config: EngineConfig, *, block: int = BLOCK, refresh_s: float = 1.0
) -> AsyncIterator[FleetEngine]:
    """A :class:`FleetEngine` over ``handle``'s replicas, with a local engine for text
    work loaded from ``config``'s models, and the fleet view refreshed every
    ``refresh_s`` (first before this yields)."""
    async with open_engine(tokenizer_config(config)) as local, anyio.create_task_group() as tg:
        fleet = FleetEngine(handle, local, block=block)
        with anyio.move_on_after(READY_TIMEOUT_S):
            while True:  # the replicas may still be starting
                await fleet.refresh()
                if fleet.replicas:
                    break
                await anyio.sleep(0.2)

        async def refresher() -> None:
            while True:
                await anyio.sleep(refresh_s)
                await fleet.refresh()

        tg.start_soon(refresher)
        try:
            yield fleet
        finally:
            tg.cancel_scope.cancel()
