"""What every route shares: the engine, the config, the tool-call store, the stored
responses and the metrics."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import attrs

from .._version import __version__
from ..config import ModelConfig, ToolCallMarkers
from ..errors import ModelNotFound
from .body import Fields
from .config import ServeConfig
from .errors import RETRY_AFTER_S, ApiError
from .metrics import Metrics
from .port import EnginePort
from .stored import ResponseStore
from .toolcalls import DEFAULT_MARKERS, ToolCallStore
from .transport import TransportStats

__all__ = ["Latch", "ServerState", "key_salt"]


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
            store=ToolCallStore(config.server.tool_call_ids),
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

    def check_model(self, model_id: str) -> None:
        """ApiError unless the model is loaded and serving: 404 unknown, 503 loading,
        failed, or configured but unloaded."""
        if model_id in self.loading:
            raise ApiError(
                503,
                "unavailable",
                f"model {model_id!r} is loading; retry shortly",
                code="model_loading",
                retry=RETRY_AFTER_S,
            )
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
        """The ``model`` label of a request's metrics: its model when loaded (so a client
        cannot grow the label set with made-up names), else ``unknown``."""
        if isinstance(model_id, str) and any(m.id == model_id for m in self.engine.list_models()):
            return model_id
        return "unknown"

    def remember_configs(self, configs: Mapping[str, ModelConfig]) -> None:
        self.model_configs.update(configs)


def _responses_dir(config: ServeConfig) -> Path | None:
    """Stored responses persist beside the cache's persistent rows, when there are any."""
    cache = config.cache
    if not cache.enabled or cache.disk_dir is None:
        return None
    return cache.disk_dir / "responses"
