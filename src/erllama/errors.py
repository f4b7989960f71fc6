"""Every exception erllama raises on purpose.

The hierarchy::

    ErllamaError                  base of everything below; catch this to catch erllama
    ├── ConfigError               a config dict/TOML/attrs value is wrong (names the key path)
    ├── ModelNotFound             no model is loaded under that id
    │   └── ModelUnloading        the model is being unloaded: it takes no new calls
    ├── ModelLoading              a model did not finish loading within the wait a call allowed
    ├── UnloadTimeout             an unload waited too long for calls still using the model
    ├── ModelAlreadyLoaded        load_model() with an id that is already taken
    ├── NotSupported              the model's backend does not implement a capability
    ├── QueueFull                 the model's request queue is at ModelConfig.max_queue
    ├── SessionBusy               a request for a session that already has one queued or running
    ├── InvalidRequest            a request argument is out of range (names the parameter)
    │   └── ContextLengthExceeded  the prompt leaves no room in the context (``prompt``)
    ├── BackendError              the backend failed (load, step, pack, ...); ``__cause__`` kept
    │   └── ModelFailed           the model failed earlier and serves nothing until reloaded
    └── CacheError                the KV cache could not do what was asked

Errors carry their facts as attributes (``exc.model_id``, ``exc.param`` ...) and build their
message from them, so callers branch on attributes, never on message text.

Foreign exceptions (from llama.cpp, a plugin, the OS) are wrapped at the plugin boundary with
``raise BackendError(...) from exc``. Cancellation is never caught or wrapped.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CacheError",
    "ConfigError",
    "ContextLengthExceeded",
    "ErllamaError",
    "InvalidRequest",
    "ModelAlreadyLoaded",
    "ModelFailed",
    "ModelLoading",
    "ModelNotFound",
    "NotSupported",
    "QueueFull",
    "SessionBusy",
    "UnloadTimeout",
    "ModelUnloading",
]


class ErllamaError(Exception):
    """Base class of every error erllama raises on purpose."""


class ConfigError(ErllamaError, ValueError):
    """A configuration value is invalid.

    ``problems`` lists ``(path, message)`` pairs, one per bad field, where ``path`` is the dotted
    key path (``"cache.ram_bytes"``, ``"models[0].n_ctx"``).
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{path or '<root>'}: {msg}" for path, msg in self.problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))

    @property
    def paths(self) -> list[str]:
        """The key paths that were rejected, in the order reported."""
        return [p for p, _ in self.problems]


class ModelNotFound(ErllamaError, LookupError):
    """No model is loaded under ``model_id``."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"no model loaded with id {model_id!r}")


class ModelUnloading(ModelNotFound):
    """Model ``model_id`` is being unloaded: a call that arrives now is refused (calls
    already in flight finish first)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.args = (f"model {model_id!r} is being unloaded",)


class ModelLoading(ErllamaError):
    """Model ``model_id`` was not ready within ``waited_s`` seconds: it is still loading, or
    waiting for room (``EngineConfig.max_loaded_models``: every loaded model is busy). The
    load goes on; retry later."""

    def __init__(self, model_id: str, waited_s: float, reason: str = "loading") -> None:
        self.model_id = model_id
        self.waited_s = waited_s
        self.reason = reason
        super().__init__(
            f"model {model_id!r} is not ready after {waited_s:g} s ({reason}); retry shortly"
        )


class UnloadTimeout(ErllamaError, TimeoutError):
    """Unloading ``model_id`` waited ``waited_s`` seconds for ``in_use`` calls that still use
    its native handle; the model was not freed and keeps serving. Retry the unload."""

    def __init__(self, model_id: str, waited_s: float, in_use: int) -> None:
        self.model_id = model_id
        self.waited_s = waited_s
        self.in_use = in_use
        super().__init__(
            f"model {model_id!r} was not unloaded: {in_use} call(s) still used it after "
            f"{waited_s:g} s"
        )


class ModelAlreadyLoaded(ErllamaError):
    """``load_model`` was given an id that is already in use."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"a model is already loaded with id {model_id!r}")


class NotSupported(ErllamaError):
    """The backend serving a model does not implement ``capability``."""

    def __init__(self, backend: str, capability: str, reason: str = "") -> None:
        self.backend = backend
        self.capability = capability
        self.reason = reason
        msg = f"backend {backend!r} does not support {capability!r}"
        super().__init__(f"{msg} ({reason})" if reason else msg)


class QueueFull(ErllamaError):
    """The model already has ``limit`` requests waiting."""

    def __init__(self, model_id: str, limit: int) -> None:
        self.model_id = model_id
        self.limit = limit
        super().__init__(f"model {model_id!r} has {limit} requests queued (max_queue)")


class SessionBusy(ErllamaError):
    """Session ``session_id`` of model ``model_id`` already has a request queued or running;
    a session serves one request at a time."""

    def __init__(self, model_id: str, session_id: object) -> None:
        self.model_id = model_id
        self.session_id = session_id
        super().__init__(f"session {session_id!r} of model {model_id!r} is busy")


class InvalidRequest(ErllamaError, ValueError):
    """A request argument is invalid; ``param`` names it."""

    def __init__(self, param: str, reason: str) -> None:
        self.param = param
        self.reason = reason
        super().__init__(f"invalid {param}: {reason}")


class ContextLengthExceeded(InvalidRequest):
    """The prompt's ``tokens`` leave no room for one generated token in the context of
    ``n_ctx`` tokens (``param`` is ``prompt``)."""

    def __init__(self, tokens: int, n_ctx: int) -> None:
        self.tokens = tokens
        self.n_ctx = n_ctx
        super().__init__(
            "prompt",
            f"{tokens} tokens do not fit the context of {n_ctx} "
            "(at least one token must be left for generation)",
        )


class BackendError(ErllamaError):
    """The backend failed while doing ``operation``; the original error is ``__cause__``."""

    def __init__(self, backend: str, operation: str, detail: str = "") -> None:
        self.backend = backend
        self.operation = operation
        self.detail = detail
        msg = f"backend {backend!r} failed during {operation}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ModelFailed(BackendError):
    """The model ``model_id`` failed earlier; unload it (and load it again) to recover."""

    def __init__(self, model_id: str, backend: str, operation: str, detail: str = "") -> None:
        self.model_id = model_id
        super().__init__(backend, operation, detail)
        self.args = (f"model {model_id!r} has failed ({self.args[0]}); unload and reload it",)


class CacheError(ErllamaError):
    """The KV cache could not complete an operation (bad directory, symlink, budget ...)."""

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"cache {operation}: {detail}")
