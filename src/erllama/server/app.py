"""The ASGI app: Starlette routes over one engine.

The app has no lifespan of its own: whoever serves it opens the engine around the server
(see run.py) and hands it in, so the engine lives exactly as long as the serving does, and
an engine failure stops the server the same way on asyncio and trio (docs/server.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import ErllamaError
from . import (
    admin,
    anthropic,
    completions,
    llamacpp,
    ollama,
    ollama_models,
    openai,
    responses,
)
from .auth import Gate
from .config import ServeConfig
from .errors import ApiError, Dialect, dialect_of, error_response, from_engine, json_response
from .guard import Guard, request_id
from .port import EnginePort
from .sse import NoResponse
from .state import ServerState

__all__ = ["build_app"]

log = logging.getLogger("erllama.server")

Handler = Callable[[Request, ServerState], Awaitable[Response]]


def _endpoint(handler: Handler, dialect: Dialect) -> Callable[[Request], Awaitable[Response]]:
    """A route: the handler with the app's state, every failure rendered in ``dialect``'s
    error shape. Anything unexpected is logged with its cause and the request id, and is a
    500 naming only the request id."""

    async def run(request: Request) -> Response:
        state: ServerState = request.app.state.erllama
        rid = request_id(request.scope)
        try:
            async with state.holding():
                return await handler(request, state)
        except ApiError as err:
            return error_response(err, dialect, request_id=rid)
        except ErllamaError as exc:
            return error_response(from_engine(exc), dialect, request_id=rid)
        except ClientDisconnect:
            return NoResponse()
        except Exception:
            log.exception("%s %s failed (request id %s)", request.method, request.url.path, rid)
            return error_response(
                ApiError(500, "internal", "internal error"), dialect, request_id=rid
            )

    run.__name__ = handler.__name__
    return run


async def health(request: Request, state: ServerState) -> Response:
    failed = [m.id for m in state.engine.list_models() if m.status == "failed"]
    return json_response({"status": "degraded" if failed else "ok"})


async def metrics(request: Request, state: ServerState) -> Response:
    body, content_type = state.metrics.exposition(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        # Name what was asked for and what there is: a client pointed at the wrong base
        # URL (a missing or doubled /v1) sees its mistake at once.
        served = ", ".join(_route_list(request.app))
        err = ApiError(
            404,
            "not_found",
            f"no route {request.method} {request.url.path}; this server serves: {served}",
            code="route_not_found",
        )
    else:
        err = ApiError(exc.status_code, "invalid_request", str(exc.detail))
    return error_response(err, dialect_of(request.url.path), request_id=request_id(request.scope))


def _route_list(app: Starlette) -> list[str]:
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            methods = sorted((route.methods or set()) - {"HEAD"})
            out.append(f"{'/'.join(methods)} {route.path}")
    return out


def _middleware(state: ServerState) -> list[Middleware]:
    """Outermost first: request hygiene (host, origin, content type, body, disconnect;
    guard.py), CORS when configured, then the API key."""
    stack = [Middleware(Guard, state=state)]
    origins = state.config.server.cors_origins
    if origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "retry-after"],
            )
        )
    stack.append(Middleware(Gate, state=state))
    return stack


def build_app(engine: EnginePort, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app serving ``engine`` (which the caller keeps open while it serves): an
    :class:`erllama.Engine`, or anything else with the calls of :class:`.port.EnginePort`."""
    config = config or ServeConfig()
    state = ServerState.create(engine, config)
    oa: Dialect = "openai"
    an: Dialect = "anthropic"
    ol: Dialect = "ollama"
    routes = [
        Route("/health", _endpoint(health, oa), methods=["GET"]),
        Route("/metrics", _endpoint(metrics, oa), methods=["GET"]),
        Route("/v1/models", _endpoint(openai.list_models, oa), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _endpoint(openai.get_model, oa), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(openai.chat_completions, oa), methods=["POST"]),
        Route("/v1/completions", _endpoint(completions.completions, oa), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(openai.embeddings, oa), methods=["POST"]),
        # llama-server's: the OpenAI routes without /v1, and its text routes.
        Route("/models", _endpoint(openai.list_models, oa), methods=["GET"]),
        Route("/chat/completions", _endpoint(openai.chat_completions, oa), methods=["POST"]),
        Route("/completions", _endpoint(completions.completions, oa), methods=["POST"]),
        Route("/embeddings", _endpoint(openai.embeddings, oa), methods=["POST"]),
        Route("/tokenize", _endpoint(llamacpp.tokenize, oa), methods=["POST"]),
        Route("/detokenize", _endpoint(llamacpp.detokenize, oa), methods=["POST"]),
        Route("/apply-template", _endpoint(llamacpp.apply_template, oa), methods=["POST"]),
        Route("/v1/messages", _endpoint(anthropic.messages, an), methods=["POST"]),
        Route("/v1/messages/count_tokens", _endpoint(anthropic.count_tokens, an), methods=["POST"]),
        Route("/v1/responses", _endpoint(responses.create, oa), methods=["POST"]),
        Route("/v1/responses/{response_id}", _endpoint(responses.retrieve, oa), methods=["GET"]),
        Route("/v1/responses/{response_id}", _endpoint(responses.delete, oa), methods=["DELETE"]),
        Route(
            "/v1/responses/{response_id}/input_items",
            _endpoint(responses.input_items, oa),
            methods=["GET"],
        ),
        Route("/api/chat", _endpoint(ollama.chat, ol), methods=["POST"]),
        Route("/api/generate", _endpoint(ollama.generate, ol), methods=["POST"]),
        Route("/api/embed", _endpoint(ollama.embed, ol), methods=["POST"]),
        Route("/api/embeddings", _endpoint(ollama.embeddings, ol), methods=["POST"]),
        Route("/api/tags", _endpoint(ollama_models.tags, ol), methods=["GET"]),
        Route("/api/ps", _endpoint(ollama_models.ps, ol), methods=["GET"]),
        Route("/api/show", _endpoint(ollama_models.show, ol), methods=["POST"]),
        Route("/api/version", _endpoint(ollama_models.version, ol), methods=["GET"]),
    ]
    if config.server.admin_enabled:
        routes += [
            Route("/admin/models", _endpoint(admin.list_models, oa), methods=["GET"]),
            Route("/admin/models", _endpoint(admin.load_model, oa), methods=["POST"]),
            Route(
                "/admin/models/{model_id:path}",
                _endpoint(admin.unload_model, oa),
                methods=["DELETE"],
            ),
        ]
    app = Starlette(
        routes=routes,
        middleware=_middleware(state),
        exception_handlers={HTTPException: _http_error},
    )
    app.state.erllama = state
    return app
