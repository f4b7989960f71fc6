"""HTTP errors: one :class:`ApiError` inside the server, rendered in each API's own shape.

Every failure a handler meets becomes an ``ApiError`` (status, kind, message, the parameter
at fault); the route's dialect renders it:

* OpenAI: ``{"error": {"message", "type", "param", "code"}}``;
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``;
* Ollama: ``{"error": "message"}`` (what the ``ollama`` clients read and raise).

The Responses API answers in OpenAI's shape.

erllama's own errors map by type (:func:`from_engine`); the table is in docs/server.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

from starlette.responses import Response

from ..errors import (
    BackendError,
    CacheError,
    ConfigError,
    ContextLengthExceeded,
    ErllamaError,
    InvalidRequest,
    ModelAlreadyLoaded,
    ModelFailed,
    ModelLoading,
    ModelNotFound,
    ModelUnloading,
    NotSupported,
    QueueFull,
    SessionBusy,
    UnloadTimeout,
)

__all__ = [
    "ApiError",
    "Dialect",
    "Kind",
    "error_body",
    "error_response",
    "from_engine",
    "json_response",
]

log = logging.getLogger("erllama.server")

Dialect = Literal["openai", "anthropic", "ollama"]
Kind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "conflict",
    "too_large",
    "rate_limit",
    "unavailable",
    "internal",
]

#: The code of a 400 for a prompt that does not fit the model's context (OpenAI's).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
#: How long a client should wait before retrying a full queue or a loading model (seconds).
RETRY_AFTER_S = 1

_OPENAI_TYPES: dict[Kind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "invalid_request_error",
    "conflict": "invalid_request_error",
    "too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "unavailable": "server_error",
    "internal": "server_error",
}
_ANTHROPIC_TYPES: dict[Kind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "conflict": "invalid_request_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "unavailable": "overloaded_error",
    "internal": "api_error",
}


class ApiError(Exception):
    """A request the server answers with an error status.

    ``param`` names the request field at fault (OpenAI's ``param``; both dialects also put
    it in the message). ``retry`` sets ``Retry-After`` (seconds); ``retryable=False`` sends
    ``x-should-retry: false``, which both official SDKs obey instead of retrying a 5xx.
    """

    def __init__(
        self,
        status: int,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.status = status
        self.kind: Kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry = retry
        self.retryable = retryable
        super().__init__(message)

    @classmethod
    def bad_param(cls, param: str, reason: str) -> ApiError:
        """400 naming the parameter: ``invalid <param>: <reason>``."""
        return cls(400, "invalid_request", f"invalid {param}: {reason}", param=param)

    @property
    def headers(self) -> dict[str, str]:
        out = {}
        if self.retry is not None:
            out["retry-after"] = str(self.retry)
        if self.retryable is not None:
            out["x-should-retry"] = "true" if self.retryable else "false"
        if self.status == 401:
            out["www-authenticate"] = "Bearer"
        return out


def from_engine(exc: ErllamaError, params: Mapping[str, str] | None = None) -> ApiError:
    """The HTTP error for one of erllama's own errors (``exc`` is its ``__cause__``).
    ``params`` renames the engine's parameter names to the API's (``prompt`` ->
    ``messages``, ``max_tokens`` -> ``max_completion_tokens``)."""
    err = _from_engine(exc, params or {})
    err.__cause__ = exc
    return err


def _from_engine(exc: ErllamaError, params: Mapping[str, str]) -> ApiError:
    if isinstance(exc, InvalidRequest):
        param = params.get(exc.param, exc.param)
        err = ApiError.bad_param(param, exc.reason)
        if isinstance(exc, ContextLengthExceeded):
            err.code = CONTEXT_LENGTH_EXCEEDED  # what OpenAI's and vLLM's clients look for
        return err
    if isinstance(exc, ModelLoading):
        return ApiError(
            503,
            "unavailable",
            f"model {exc.model_id!r} is not ready yet ({exc.reason}); retry shortly",
            code="model_loading",
            retry=RETRY_AFTER_S,
        )
    if isinstance(exc, ModelUnloading):
        return ApiError(
            503,
            "unavailable",
            f"model {exc.model_id!r} is being unloaded",
            code="model_unloading",
            retry=RETRY_AFTER_S,
        )
    if isinstance(exc, UnloadTimeout):
        return ApiError(
            503,
            "unavailable",
            str(exc),
            param="model_id",
            code="unload_timeout",
            retry=RETRY_AFTER_S,
        )
    if isinstance(exc, ModelNotFound):
        return ApiError(
            404,
            "not_found",
            f"the model {exc.model_id!r} does not exist",
            param="model",
            code="model_not_found",
        )
    if isinstance(exc, QueueFull):
        return ApiError(
            429,
            "rate_limit",
            f"model {exc.model_id!r} has {exc.limit} requests queued; retry later",
            code="queue_full",
            retry=RETRY_AFTER_S,
        )
    if isinstance(exc, SessionBusy):
        return ApiError(
            409,
            "conflict",
            f"erllama.session_id {exc.session_id!r} already has a request queued or running",
            param="erllama.session_id",
            code="session_busy",
            retry=RETRY_AFTER_S,
        )
    if isinstance(exc, NotSupported):
        return ApiError(
            400,
            "invalid_request",
            f"not supported by this model: {exc.capability}",
            code="not_supported",
        )
    if isinstance(exc, ModelAlreadyLoaded):
        return ApiError(409, "conflict", str(exc), param="id", code="model_exists", retryable=False)
    if isinstance(exc, ConfigError):
        paths = ", ".join(exc.paths) or "config"
        return ApiError(400, "invalid_request", str(exc), param=paths)
    if isinstance(exc, ModelFailed):
        return ApiError(
            503,
            "unavailable",
            f"model {exc.model_id!r} has failed; an operator must unload and reload it",
            code="model_failed",
            retryable=False,
        )
    if isinstance(exc, BackendError | CacheError):
        # The detail (a native error's text, a path) is for the log, not for the client.
        what = "the KV cache" if isinstance(exc, CacheError) else "the model"
        return ApiError(
            503, "unavailable", f"{what} failed while serving this request", code="backend_error",
            retryable=False,
        )  # fmt: skip
    return ApiError(500, "internal", "internal error", retryable=False)


def error_body(err: ApiError, dialect: Dialect, request_id: str | None = None) -> dict[str, Any]:
    """The error in ``dialect``'s shape. A server-side failure (5xx) names the request id,
    which the log line with its cause names too."""
    message = err.message
    if err.status >= 500 and request_id is not None:
        message = f"{message} (request id {request_id})"
    if dialect == "ollama":
        return {"error": message}
    if dialect == "anthropic":
        return {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES[err.kind], "message": message},
        }
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES[err.kind],
            "param": err.param,
            "code": err.code,
        }
    }


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """Compact UTF-8 JSON. A value JSON cannot carry (NaN in a vector) raises ValueError."""
    raw = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(raw.encode(), status, headers=headers, media_type="application/json")


def error_response(err: ApiError, dialect: Dialect, request_id: str | None = None) -> Response:
    if err.status >= 500:
        log_cause(err, request_id)
    return json_response(error_body(err, dialect, request_id), err.status, err.headers)


def log_cause(err: ApiError, request_id: str | None) -> None:
    """Log the engine error behind a 5xx (its detail is kept from the client)."""
    cause = err.__cause__
    if isinstance(cause, BackendError | CacheError):
        log.warning("request %s: %s", request_id, cause)


def dialect_of(path: str) -> Dialect:
    """Which API's error shape a path answers in: Anthropic's under /v1/messages, Ollama's
    under /api/, else OpenAI's."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"
