"""Serving the app with Hypercorn, on asyncio or trio (whichever loop runs this code).

Hypercorn is the ASGI server because it runs on both loops (``hypercorn.asyncio.serve`` and
``hypercorn.trio.serve`` over one protocol core). Two things learnt the hard way:

* Hypercorn must never see a cancellation: cancelling ``hypercorn.asyncio.serve`` with a
  request in flight raises ``InvalidStateError`` (pgjones/hypercorn#184) and skips the
  graceful drain. So it runs shielded, and our cancellation becomes its
  ``shutdown_trigger``: in-flight requests get ``graceful_timeout``, then are cancelled.
* To serve on port 0 and learn the port on both loops, the socket is bound here and handed
  over as ``fd://N`` (Hypercorn takes ownership and closes it).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.types import ASGIApp

from .app import build_app
from .config import ServeConfig
from .port import EnginePort
from .state import ServerState

__all__ = ["RunningServer", "bind_socket", "open_server", "serve_http"]

log = logging.getLogger("erllama.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6, as ``host`` resolves); port 0 picks one."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return socket.create_server(address[:2], family=family, backlog=128)


async def serve_http(
    app: ASGIApp,
    config: HypercornConfig,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; the cancellation becomes a graceful shutdown."""
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]
    stop = anyio.Event()

    async def run() -> None:
        with anyio.CancelScope(shield=True):
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()


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
async def open_server(engine: EnginePort, config: ServeConfig) -> AsyncIterator[RunningServer]:
    """Serve ``engine`` over HTTP while the block runs (``config.server.host`` and
    ``port``; port 0 picks a free one, reported in ``RunningServer.port``). Leaving the
    block stops accepting, gives in-flight requests ``graceful_timeout_s``, then cancels
    them."""
    server = config.server
    app = build_app(engine, config)
    sock = bind_socket(server.host, server.port)
    port = sock.getsockname()[1]
    hc = HypercornConfig()
    hc.bind = [f"fd://{sock.detach()}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("erllama.server.http")
    hc.graceful_timeout = server.graceful_timeout_s
    hc.keep_alive_timeout = 75.0  # longer than clients' pools keep idle connections
    host = f"[{server.host}]" if ":" in server.host else server.host
    running = RunningServer(url=f"http://{host}:{port}", host=server.host, port=port, app=app)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_http, app, hc)
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
