"""API keys, checked on every route but ``/health``; the admin routes take admin keys only.

A key comes as ``Authorization: Bearer KEY`` (what the ``openai`` package sends, and the
``anthropic`` package too since 2.x) or ``x-api-key: KEY`` (Anthropic's documented header,
curl users). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, dialect_of, error_response
from .state import ServerState

__all__ = ["Gate", "authorized", "is_admin_path", "matching_key", "route_label"]

#: Paths that need no key.
OPEN_PATHS = frozenset({"/health"})

_ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/models",
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/tokenize",
    "/detokenize",
    "/apply-template",
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
    found = matching_key(keys, headers)
    return found if isinstance(found, ApiError) else None


def matching_key(keys: Iterable[str], headers: Iterable[tuple[bytes, bytes]]) -> str | ApiError:
    """The key of ``keys`` a request presents, or the 401 to send."""
    presented = _presented(headers)
    if not presented:
        return ApiError(
            401,
            "authentication",
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="missing_api_key",
        )
    wanted = list(keys)
    for given in presented:
        # Every comparison runs, so timing says nothing about which key came close.
        hits = [hmac.compare_digest(given, w.encode()) for w in wanted]
        if any(hits):
            return wanted[hits.index(True)]
    return ApiError(401, "authentication", "invalid API key", code="invalid_api_key")


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


class Gate:
    """ASGI middleware in front of every route but ``/health``: the API key.

    User keys (``server.api_keys``) and admin keys (``server.admin_keys``) both open the
    user routes; only admin keys open ``/admin/...`` (403 for a user key). The key's cache
    salt goes into the request's ``state`` (``cache_salt``) for the routes to pass on, so
    one key's requests never reuse another key's cached prompts (unless
    ``server.share_cache_across_keys``)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        refused = self._refusal(scope, path)
        if refused is not None:
            response = error_response(refused, dialect_of(path))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, path: str) -> ApiError | None:
        server = self.state.config.server
        if path in OPEN_PATHS:
            return None
        admin = is_admin_path(path)
        keys = server.admin_keys if admin and server.admin_keys else self.state.keys
        if not keys:
            return None
        found = matching_key(self.state.keys, scope["headers"])
        if isinstance(found, ApiError):
            return found
        if admin and server.admin_keys and found not in server.admin_keys:
            return ApiError(
                403,
                "permission",
                "this API key may not use the admin routes (server.admin_keys)",
                code="admin_key_required",
                retryable=False,
            )
        if not server.share_cache_across_keys:
            scope.setdefault("state", {})["cache_salt"] = self.state.salts[found]
        return None
