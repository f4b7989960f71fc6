"""Serving the app on asyncio or trio (whichever loop runs this code).

Hypercorn is the HTTP core because it runs on both loops over one protocol implementation;
the accept loop and each connection's limits are ours (:mod:`.transport` says why). Two
things learnt the hard way:

* Hypercorn must never see a cancellation: cancelling ``hypercorn.asyncio.serve`` with a
  request in flight raises ``InvalidStateError`` (pgjones/hypercorn#184) and skips the
  graceful drain. So our cancellation is a graceful stop: in-flight requests get
  ``graceful_timeout_s``, then streams send their error event, then what is left is
  cancelled.
* To serve on port 0 and learn the port on both loops, the socket is bound here.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
from starlette.applications import Starlette

from .app import build_app
from .config import ServeConfig, ServerConfig
from .port import EnginePort
from .state import ServerState
from .transport import Limits, auto_max_connections, serve_connections

__all__ = ["RunningServer", "bind_socket", "limits_of", "open_server", "serve_http"]

#: Serve an app on a listening socket until cancelled (see :func:`.transport.serve_connections`).
serve_http = serve_connections


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6, as ``host`` resolves); port 0 picks one."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return socket.create_server(address[:2], family=family, backlog=128)


def limits_of(server: ServerConfig) -> Limits:
    return Limits(
        max_connections=server.max_connections or auto_max_connections(),
        header_timeout_s=server.header_timeout_s,
        keep_alive_s=server.keep_alive_timeout_s,
        send_timeout_s=server.send_timeout_s,
        graceful_timeout_s=server.graceful_timeout_s,
    )


@attrs.frozen(kw_only=True)
class RunningServer:
    url: str
    host: str
    port: int
    app: Starlette

    @property
    def state(self) -> ServerState:
        state: ServerState = self.app.state.erllama
        return state


@asynccontextmanager
async def open_server(
    engine: EnginePort, config: ServeConfig, sock: socket.socket | None = None
) -> AsyncIterator[RunningServer]:
    """Serve ``engine`` over HTTP while the block runs (``config.server.host`` and
    ``port``; port 0 picks a free one, reported in ``RunningServer.port``), or on ``sock``,
    a listening socket bound already (``erllama serve`` binds before it loads models, so
    a port in use is one line, not a traceback after the load). Leaving the block stops
    accepting, gives in-flight requests ``graceful_timeout_s``, then cancels them."""
    server = config.server
    app = build_app(engine, config)
    state: ServerState = app.state.erllama
    if sock is None:
        sock = bind_socket(server.host, server.port)
    port = sock.getsockname()[1]
    host = f"[{server.host}]" if ":" in server.host else server.host
    running = RunningServer(url=f"http://{host}:{port}", host=server.host, port=port, app=app)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve_connections(
                    app,
                    sock,
                    limits_of(server),
                    state.transport,
                    on_deadline=state.stopping.set,
                    task_status=task_status,
                )
            )
            try:
                yield running
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                # Re-raised below, outside the task group: the caller sees its own
                # exception, not an exception group around it.
                body_error = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        running.state.responses.close()  # no request is left to use it
    if body_error is not None:
        raise body_error
