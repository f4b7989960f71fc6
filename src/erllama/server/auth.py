"""API keys, checked on every route but ``/health``, and the per-route request counter.

A key comes as ``Authorization: Bearer KEY`` (what the ``openai`` package sends, and the
``anthropic`` package too since 2.x) or ``x-api-key: KEY`` (Anthropic's documented header,
curl users). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, dialect_of, error_response
from .state import ServerState

__all__ = ["Gate", "route_label"]

#: Paths that need no key.
OPEN_PATHS = frozenset({"/health"})

_ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/version",
    "/admin/models",
)


def route_label(path: str) -> str:
    """The ``route`` label of a path: a route template, never the raw path (a client must
    not be able to grow the label set)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/responses/") and path.count("/") == 3:
        return "/v1/responses/{response_id}"
    if path.startswith("/v1/responses/") and path.endswith("/input_items") and path.count("/") == 4:
        return "/v1/responses/{response_id}/input_items"
    for prefix in ("/v1/models/", "/admin/models/"):
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix + "{model_id}"
    return "other"


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    keys = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys


def authorized(keys: Iterable[str], headers: Iterable[tuple[bytes, bytes]]) -> ApiError | None:
    """None when a presented key matches one of ``keys``; else the 401 to send."""
    presented = _presented(headers)
    if not presented:
        return ApiError(
            401,
            "authentication",
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="missing_api_key",
        )
    wanted = [k.encode() for k in keys]
    for given in presented:
        # Every comparison runs, so timing says nothing about which key came close.
        if any([hmac.compare_digest(given, w) for w in wanted]):  # noqa: C419
            return None
    return ApiError(401, "authentication", "invalid API key", code="invalid_api_key")


class Gate:
    """ASGI middleware in front of every route: the key check, and
    ``erllama_http_requests_total{route, status}``."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            keys = self.state.keys
            if keys and path not in OPEN_PATHS:
                refused = authorized(keys, scope["headers"])
                if refused is not None:
                    response = error_response(refused, dialect_of(path))
                    await response(scope, receive, counting_send)
                    return
            await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.http.labels(route_label(path), str(status or 499)).inc()
