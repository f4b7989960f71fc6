"""``erllama serve``'s configuration: the engine's settings plus a ``[server]`` table.

One TOML file names everything (see docs/server.md)::

    thinking_signing_key = "change me"     # optional

    [server]
    host = "127.0.0.1"
    port = 8000
    max_tokens = 4096                      # cap on a request's max_tokens
    models_dir = "/srv/models"             # admin loads may name GGUF files under here

    [cache]                                # erllama.CacheConfig
    disk_dir = "/var/cache/erllama"

    preload = ["smol"]                     # loaded at start (default: every model);
    max_loaded_models = 2                  # the others load on their first request

    [models.smol]                          # erllama.ModelConfig, by model id
    model_path = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    n_ctx = 2048
    keep_alive_s = 300                     # unloaded after 5 idle minutes

It is read through erllama's one cattrs converter, so an unknown key or a bad value is a
``ConfigError`` naming every bad key path (``server.port``, ``models.smol.n_ctx``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ..config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    PressureConfig,
    _checked,
    _int_field,
    _number_field,
    _opt_names,
    _Problems,
    _structure_fields,
    converter,
    load_config_as,
)

__all__ = ["ADMIN_KEY_ENV", "API_KEY_ENV", "ServeConfig", "ServerConfig", "load_serve_config"]

#: The environment variable holding an API key (added to ``server.api_keys``).
API_KEY_ENV = "ERLLAMA_API_KEY"
#: The environment variable holding an admin key (added to ``server.admin_keys``).
ADMIN_KEY_ENV = "ERLLAMA_ADMIN_KEY"

KIB = 1024
MIB = 1024 * KIB


def _host(value: Any) -> str | None:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return None
    return f"must be a host name or address, got {value!r}"


def _port(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return None
    return f"must be an integer in [0, 65535] (0: any free port), got {value!r}"


def _keys(value: Any) -> str | None:
    for key in value:
        if not isinstance(key, str) or len(key) < 8 or any(c.isspace() for c in key):
            return "every key must be a string of at least 8 characters without whitespace"
    return None


def _paths(value: Any) -> tuple[Path, ...]:
    return tuple(Path(v) for v in value)


def _opt_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _opt_int(minimum: int) -> Any:
    def check(value: Any) -> str | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return None if value is None or value >= minimum else f"must be >= {minimum}"
        return f"must be an integer or absent, got {value!r}"

    return check


def _names(value: Any) -> str | None:
    if all(isinstance(v, str) and v and not any(c.isspace() for c in v) for v in value):
        return None
    return "must be non-empty strings without whitespace"


def _opt_name(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return None
    return f"must be a model id or absent, got {value!r}"


def _backends(value: Any) -> str | None:
    if all(isinstance(v, str) and v for v in value):
        return None
    return "must be backend names"


@attrs.frozen(kw_only=True)
class ServerConfig:
    """The ``[server]`` table: where to listen, who may call, and the limits of a request."""

    host: str = _checked(_host, default="127.0.0.1")
    port: int = _checked(_port, default=8000)
    #: Keys a client must send (``Authorization: Bearer KEY`` or ``x-api-key: KEY``) on
    #: every route but ``/health``; empty: no key needed. ``--api-key`` and the
    #: ``ERLLAMA_API_KEY`` environment variable add to these.
    api_keys: tuple[str, ...] = _checked(_keys, default=(), converter=tuple)
    #: The most tokens one request may generate; also the default when a request names none.
    max_tokens: int = _int_field(4096, 1)
    #: The largest request body accepted (413 beyond).
    max_body_bytes: int = _int_field(4 * MIB, 1024)
    #: Tool-call ids remembered with the exact reply they came from (least recently used
    #: dropped first).
    tool_call_ids: int = _int_field(4096, 0)
    #: Responses-API responses kept for ``previous_response_id`` and ``GET
    #: /v1/responses/{id}`` (least recently used dropped first); also files under the
    #: cache's ``disk_dir`` when it has one, so a restart keeps them. 0: none.
    stored_responses: int = _int_field(1024, 0)
    #: Temperature of an OpenAI or Anthropic request that names none (both document 1.0).
    default_temperature: float = _number_field(1.0, 0)
    #: Serve the admin routes (``/admin/models``: load and unload models). Off by default;
    #: ``admin_keys`` turns them on too.
    admin: bool = False
    #: Keys for the admin routes, and only they (user keys get 403 there); they are valid
    #: on every other route too. Required for the admin routes when ``api_keys`` is set.
    admin_keys: tuple[str, ...] = _checked(_keys, default=(), converter=tuple)
    #: Admin loads may name a GGUF file under this directory (symbolic links resolved) ...
    models_dir: Path | None = attrs.field(default=None, converter=_opt_path)
    #: ... or one of these files, or a file a model in the config was loaded from.
    model_paths: tuple[Path, ...] = attrs.field(default=(), converter=_paths)
    #: Backends an admin load may name (``backend`` in its body).
    admin_backends: tuple[str, ...] = _checked(_backends, default=("llama_cpp",), converter=tuple)
    #: How long in-flight requests get to finish when the server stops, in seconds.
    graceful_timeout_s: float = _number_field(5.0, 0)
    #: ``Host`` header values accepted (the port is ignored; ``"*"``: any). Empty: on a
    #: loopback address only ``localhost``, ``127.0.0.1`` and ``[::1]`` (a web page that
    #: rebinds its DNS name to 127.0.0.1 is refused), on any other address any host.
    allowed_hosts: tuple[str, ...] = _checked(_names, default=(), converter=tuple)
    #: Web origins allowed to call from a browser (CORS; ``"*"``: any). Empty: a request
    #: that carries an ``Origin`` header (a browser's cross-site request) is refused.
    cors_origins: tuple[str, ...] = _checked(_names, default=(), converter=tuple)
    #: Share cache hits between API keys. Off: each key's requests reuse only the KV of
    #: that key's own earlier requests (cached_tokens would otherwise let one key
    #: recover another's prompts token by token).
    share_cache_across_keys: bool = False
    #: Open connections at most (503 beyond). None: the descriptor limit less a reserve,
    #: at most 1024.
    max_connections: int | None = _checked(_opt_int(1), default=None)
    #: From a connection's start (or a request's first byte) to its complete headers.
    header_timeout_s: float = _number_field(10.0, 0.1)
    #: From a request's headers to the end of its body (408 beyond).
    body_timeout_s: float = _number_field(30.0, 0.1)
    #: How long an idle connection is kept open between requests (longer than clients'
    #: pools keep idle connections, so a client never reuses one the server just closed).
    keep_alive_timeout_s: float = _number_field(75.0, 0.1)
    #: How long a response may wait for a client that does not read before the connection
    #: is closed and its request cancelled.
    send_timeout_s: float = _number_field(30.0, 0.1)
    #: Bytes of one stream's events held for a client that reads slower than the model
    #: writes; beyond, the request is cancelled and the connection closed.
    stream_buffer_bytes: int = _int_field(1 * MIB, 4 * KIB)
    #: Messages in one chat request at most (each is rendered by the chat template).
    max_messages: int = _int_field(2048, 1)
    #: How long a request for a model that is not loaded waits for its load (or for room
    #: under ``max_loaded_models``) before a 503 with ``Retry-After``; the load goes on.
    load_wait_s: float = _number_field(120.0, 0)
    #: The model that serves a request naming a model this server does not know (or none),
    #: as llama-server and LM Studio answer any name with their one model. None (the
    #: default): such a request is a 404.
    default_model: str | None = _checked(_opt_name, default=None)

    def __attrs_post_init__(self) -> None:
        problems = _Problems(self)
        problems.check(
            not (self.admin_enabled and self.api_keys and not self.admin_keys),
            "admin_keys",
            "the admin routes of a server with api_keys need admin keys of their own "
            "(user keys cannot load or unload models)",
        )
        problems.raise_any()

    @property
    def admin_enabled(self) -> bool:
        return self.admin or bool(self.admin_keys)


@attrs.frozen(kw_only=True)
class ServeConfig:
    """Everything ``erllama serve`` runs with: the ``[server]`` table and the engine's own
    keys (``cache``, ``pressure``, ``models``, ``thinking_signing_key``, ``preload``,
    ``max_loaded_models``) beside it."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    pressure: PressureConfig = attrs.field(factory=PressureConfig)
    models: Mapping[str, ModelConfig] = attrs.field(factory=dict)
    thinking_signing_key: str | None = None
    #: Models loaded at start (None: every one); the others load on their first request.
    preload: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_names)
    #: Models loaded at once at most (see ``erllama.EngineConfig.max_loaded_models``).
    max_loaded_models: int | None = None

    def __attrs_post_init__(self) -> None:
        self.engine_config()  # the engine's checks (preload, max_loaded_models) run here

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            cache=self.cache,
            pressure=self.pressure,
            models=dict(self.models),
            thinking_signing_key=self.thinking_signing_key,
            preload=self.preload,
            max_loaded_models=self.max_loaded_models,
        )

    def with_server(self, **changes: Any) -> ServeConfig:
        """A copy with some ``[server]`` values replaced (command-line options)."""
        return attrs.evolve(self, server=attrs.evolve(self.server, **changes))


for _cls in (ServerConfig, ServeConfig):
    attrs.resolve_types(_cls)
    converter.register_structure_hook(_cls, _structure_fields)


def load_serve_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> ServeConfig:
    """Read a :class:`ServeConfig` from a TOML file path or a mapping (ConfigError naming
    every bad key path)."""
    return load_config_as(source, ServeConfig)
