"""What every route shares: the engine, the config, the tool-call store, the stored
responses and the metrics."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from pathlib import Path

import anyio
import attrs

from .._version import __version__
from ..cache.records import RecordStore
from ..config import ModelConfig, ToolCallMarkers
from ..errors import (
    BackendError,
    CacheError,
    ConfigError,
    ErllamaError,
    ModelLoading,
    ModelNotFound,
    ModelUnloading,
)
from ..lifecycle import KeepAlive
from .body import Fields
from .config import ServeConfig
from .errors import RETRY_AFTER_S, ApiError, from_engine
from .metrics import Metrics
from .port import EnginePort
from .stored import ResponseStore
from .toolcalls import DEFAULT_MARKERS, ToolCallStore
from .transport import TransportStats

__all__ = ["Latch", "ServerState", "key_salt"]

log = logging.getLogger("erllama.server")

#: The models the running route holds loaded (see ``ServerState.holding``).
_HOLDS: ContextVar[AsyncExitStack | None] = ContextVar("erllama_server_holds", default=None)


def key_salt(key: str) -> str:
    """The cache salt of an API key: a hash, so the key itself never reaches the engine
    (nor its logs or cache files)."""
    return hashlib.sha256(b"erllama-cache-salt\0" + key.encode()).hexdigest()


class Latch:
    """A one-way event that may be made outside an event loop (``build_app`` is
    synchronous; an ``anyio.Event`` needs a running loop)."""

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


@attrs.define(eq=False)
class ServerState:
    """One app's shared state. Event loop only."""

    engine: EnginePort
    config: ServeConfig
    metrics: Metrics
    store: ToolCallStore
    #: Responses-API responses by id (``previous_response_id``, ``GET /v1/responses/{id}``).
    responses: ResponseStore
    #: What the transport saw (connections, refusals, timeouts), for the metrics.
    transport: TransportStats = attrs.Factory(TransportStats)
    #: Set when the server's graceful timeout ran out: streams still running send their
    #: error event and end.
    stopping: Latch = attrs.Factory(Latch)
    #: Each API key's cache salt (see :func:`key_salt`).
    salts: dict[str, str] = attrs.Factory(dict)
    #: The config each model was loaded with (from the config file or an admin load), for
    #: its tool-call markers.
    model_configs: dict[str, ModelConfig] = attrs.Factory(dict)
    #: Models an admin load is loading now: requests for them get 503 and Retry-After.
    loading: set[str] = attrs.Factory(set)
    #: Unix time the server started (the ``created`` of every model it lists).
    started: int = attrs.Factory(lambda: int(time.time()))
    fingerprint: str = f"erllama-{__version__}"

    @classmethod
    def create(cls, engine: EnginePort, config: ServeConfig) -> ServerState:
        transport = TransportStats()
        return cls(
            engine=engine,
            config=config,
            metrics=Metrics(engine, transport),
            transport=transport,
            store=ToolCallStore(config.server.tool_call_ids, records=_call_records(config)),
            responses=ResponseStore(config.server.stored_responses, _responses_dir(config)),
            model_configs=dict(config.models),
            salts={k: key_salt(k) for k in (*config.server.api_keys, *config.server.admin_keys)},
        )

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key that may call the user routes (admin keys included)."""
        return self.config.server.api_keys + self.config.server.admin_keys

    def markers(self, model_id: str) -> ToolCallMarkers:
        """The tool-call markers the engine matches on this model (its config's, its
        template's, or Hermes'), which a forced call's grammar and a replayed call must
        write too; Hermes' when the engine has none (``detect_markers`` off)."""
        try:
            pair = self.engine.model_info(model_id).tool_call_markers
        except ModelNotFound:
            pair = None
        config = self.model_configs.get(model_id)
        if config is not None and config.tool_call_markers is not None:
            ours = config.tool_call_markers
            if pair is None or pair == (ours.start, ours.end):
                return ours  # with its payload markers
        if pair is not None:
            return ToolCallMarkers(start=pair[0], end=pair[1])
        return DEFAULT_MARKERS

    def matches_calls(self, model_id: str) -> bool:
        """Whether the engine marks this model's tool calls (it does unless the model's
        config turned ``detect_markers`` off and named no markers)."""
        try:
            return self.engine.model_info(model_id).tool_call_markers is not None
        except ModelNotFound:
            return False

    @asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """Around a route: the models it uses (:meth:`use_model`) stay loaded until it
        returns. A streaming route returns once its request is queued, and the request
        keeps its model busy until it ends; the model's keep-alive runs from then."""
        stack = AsyncExitStack()
        token = _HOLDS.set(stack)
        try:
            yield
        finally:
            _HOLDS.reset(token)
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    async def use_model(
        self, model_id: str, keep_alive: float | KeepAlive | None = KeepAlive.DEFAULT
    ) -> float:
        """The model loaded and serving for the rest of the route (loaded first if it is
        not: a request arriving during any load, an admin's too, waits for it), or
        ApiError: 404 for a model the server does not know; 503 past
        ``server.load_wait_s`` (with ``Retry-After``; the load goes on), for a failed model
        or a load that failed. ``keep_alive``: Ollama's, in seconds (None: for good); left
        out, the model's configured ``keep_alive_s``. Returns the seconds it waited for
        the model (Ollama's ``load_duration``)."""
        start = time.monotonic()
        held = self.engine.hold(
            model_id, keep_alive_s=keep_alive, wait_s=self.config.server.load_wait_s
        )
        stack = _HOLDS.get()
        try:
            if stack is not None:
                await stack.enter_async_context(held)
            else:
                async with held:
                    pass
        except (ModelLoading, ModelUnloading) as exc:
            raise from_engine(exc) from exc
        except ModelNotFound:
            pass  # check_model says which error
        except (BackendError, CacheError, ConfigError) as exc:
            log.warning("model %s could not be loaded: %s", model_id, exc)
            raise ApiError(
                503,
                "unavailable",
                f"model {model_id!r} could not be loaded; the server log says why",
                code="model_load_failed",
                retryable=False,
            ) from exc
        except ErllamaError as exc:
            raise from_engine(exc) from exc
        self.check_model(model_id)
        return time.monotonic() - start

    def check_model(self, model_id: str) -> None:
        """ApiError unless the model is loaded and serving: 404 unknown, 503 loading,
        failed, or configured but unloaded (a fleet of replicas: erllama.ray, which loads
        nothing on demand). Routes call :meth:`use_model`, which loads it first."""
        if model_id in self.loading:
            raise _loading(model_id)
        try:
            info = self.engine.model_info(model_id)
        except ModelNotFound:
            if model_id in self.config.models:
                raise ApiError(
                    503,
                    "unavailable",
                    f"model {model_id!r} is configured but not loaded (unloaded by an admin "
                    "or under memory pressure); load it with POST /admin/models",
                    code="model_not_loaded",
                    retryable=False,
                ) from None
            raise ApiError(
                404,
                "not_found",
                f"the model {model_id!r} does not exist",
                param="model",
                code="model_not_found",
            ) from None
        if info.status == "failed":
            raise ApiError(
                503,
                "unavailable",
                f"model {model_id!r} has failed ({info.error}); an operator must unload "
                "and reload it",
                code="model_failed",
                retryable=False,
            )

    def model_of(self, body: Fields, field: str = "model") -> str:
        """The model a request names. With ``server.default_model`` (off by default), a
        name this server does not know, or none, is that model, as llama-server and LM
        Studio serve whatever name a client was set up with."""
        default = self.config.server.default_model
        if default is None:
            return body.req_text(field)
        name = body.text(field)
        if name and self.knows(name):
            return name
        return default

    def knows(self, model_id: str) -> bool:
        """A model loaded, loading, or in the config (unloaded ones keep their 503)."""
        if model_id in self.loading or model_id in self.config.models:
            return True
        try:
            self.engine.model_info(model_id)
        except ModelNotFound:
            return False
        return True

    def model_label(self, model_id: object) -> str:
        """The ``model`` label of a request's metrics: its model when the server knows it,
        loaded or not (so a client cannot grow the label set with made-up names), else
        ``unknown``."""
        if isinstance(model_id, str) and model_id in self.known_models():
            return model_id
        return "unknown"

    def known_models(self) -> list[str]:
        """Every model the server may serve: loaded, loading, or configured and unloaded."""
        ids = [m.id for m in self.engine.model_states()]
        ids += [m.id for m in self.engine.list_models() if m.id not in ids]
        return ids + [m for m in self.config.models if m not in ids]

    def remember_configs(self, configs: Mapping[str, ModelConfig]) -> None:
        self.model_configs.update(configs)


def _loading(model_id: str) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"model {model_id!r} is loading; retry shortly",
        code="model_loading",
        retry=RETRY_AFTER_S,
    )


def _responses_dir(config: ServeConfig) -> Path | None:
    """Stored responses persist beside the cache's persistent rows, when there are any."""
    cache = config.cache
    if not cache.enabled or cache.disk_dir is None:
        return None
    return cache.disk_dir / "responses"


def _call_records(config: ServeConfig) -> RecordStore | None:
    """Tool-call ids persist beside the cache's file-tier rows, when there are any."""
    dirs = config.cache.record_dirs
    if not dirs or not config.cache.records:
        return None
    return RecordStore(dirs, "tool-calls", config.cache.records)
