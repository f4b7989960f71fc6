"""Connections: our accept loop around Hypercorn's per-connection protocol core.

Hypercorn parses HTTP/1.1 (h11) and runs the ASGI app, on asyncio and on trio; its own
accept loop and connection handling cannot be configured to survive hostile clients:

* a connection the client closed while idle is kept (with its descriptor, on trio) until
  the keep-alive timer fires, because the timer task holds the connection's task group open;
* nothing caps the number of connections, and at the descriptor limit asyncio's accept
  loop logs a traceback per failed ``accept()`` (hundreds of MB of log a minute);
* a client that stops reading blocks its response's writes forever (on trio they are
  shielded from cancellation too), so the connection and its request never end;
* a fresh connection that sends nothing waits out the whole keep-alive timeout;
* on trio, a connection that must close after its response (``Connection: close``,
  HTTP/1.0) is left open when the app's own disconnect listener cancels the close midway.

So the accept loop is ours (the same code on both loops, through anyio), and each accepted
socket is served by a small subclass of Hypercorn's ``TCPServer`` for the running loop
(:mod:`._conn_asyncio`, :mod:`._conn_trio`) that fixes the last four. The limits are the
``[server]`` settings named in :class:`Limits`; what happened is counted in
:class:`TransportStats` (exported as metrics).
"""

from __future__ import annotations

import errno
import json
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import attrs
import sniffio
from anyio.abc import TaskGroup, TaskStatus
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from starlette.types import ASGIApp

__all__ = ["Limits", "ThrottledLog", "TransportStats", "auto_max_connections", "serve_connections"]

log = logging.getLogger("erllama.server")

#: ``accept()`` errors that mean "out of descriptors or memory": retry after a pause.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Pause after such an error: long enough not to spin, short enough to notice a freed slot.
ACCEPT_RETRY_S = 0.1
#: Connections accepted per wake-up before other tasks get a turn.
ACCEPT_BATCH = 64
#: Connections over the cap being answered 503 at once; beyond, they are closed unanswered
#: (each answer holds a descriptor for up to ``REFUSAL_S``).
MAX_REFUSING = 64
REFUSAL_S = 0.5
#: Descriptors left to everything but connections when the cap is derived from the limit:
#: model files, cache files, pipes, the refusals above.
RESERVED_FDS = 192
#: The derived cap is at most this (a larger one must be configured).
AUTO_MAX_CONNECTIONS = 1024
#: After the graceful timeout, how long streams get to send their error event.
FAREWELL_S = 1.0

_REFUSAL_BODY = json.dumps(
    {
        "error": {
            "message": "the server has too many open connections; retry shortly",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    },
    separators=(",", ":"),
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


def auto_max_connections() -> int:
    """The connection cap when none is configured: what the descriptor limit leaves after
    ``RESERVED_FDS``, at most ``AUTO_MAX_CONNECTIONS`` (at least 8)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return AUTO_MAX_CONNECTIONS
    return max(8, min(AUTO_MAX_CONNECTIONS, soft - RESERVED_FDS))


@attrs.frozen(kw_only=True)
class Limits:
    """What one connection may cost (all from ``[server]``; see docs/server.md)."""

    max_connections: int
    #: From a connection's start, or the first byte of a request, to its complete headers.
    header_timeout_s: float
    #: How long an idle connection is kept between requests.
    keep_alive_s: float
    #: How long one write may wait for a client that does not read.
    send_timeout_s: float
    #: How long in-flight requests get when the server stops.
    graceful_timeout_s: float


@attrs.define
class TransportStats:
    """What the transport saw, for ``/metrics``. Event loop only."""

    open: int = 0
    accepted: int = 0
    #: Over the cap: answered 503 (``refused``) or, with too many refusals pending, closed
    #: unanswered (``dropped``).
    refused: int = 0
    dropped: int = 0
    #: ``accept()`` failed for lack of descriptors or memory.
    accept_errors: int = 0
    #: Connections closed because headers, a body or a write took too long.
    header_timeouts: int = 0
    body_timeouts: int = 0
    send_timeouts: int = 0


class ThrottledLog:
    """Log a recurring condition once, then at most once per ``every_s`` with how many were
    not logged in between (a condition that floods, such as failing accepts, must not fill
    the disk)."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last report)"
        self._suppressed = 0
        self._last = now
        self.logger.warning(message, *args)


#: Serves one accepted socket to its end (closing it); one per event loop library.
ServeOne = Callable[[socket.socket], Awaitable[None]]


def _connection_runner(
    app: ASGIApp, limits: Limits, stats: TransportStats, context: object
) -> ServeOne:
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("erllama.server.http")
    config.keep_alive_timeout = limits.keep_alive_s
    wrapped = ASGIWrapper(app)  # type: ignore[arg-type]
    if sniffio.current_async_library() == "trio":
        from ._conn_trio import serve_socket
    else:
        from ._conn_asyncio import serve_socket

    async def serve_one(sock: socket.socket) -> None:
        await serve_socket(wrapped, config, context, limits, stats, sock)

    return serve_one


def _worker_context() -> object:
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio.worker_context import WorkerContext
    else:
        from hypercorn.asyncio.worker_context import WorkerContext  # type: ignore[assignment]
    return WorkerContext(None)


async def _refuse(sock: socket.socket) -> None:
    """Answer a connection over the cap with a 503 and close it. What the client sent is
    read first (briefly), so that closing does not reset the connection under the answer."""
    try:
        with anyio.move_on_after(REFUSAL_S / 2):
            await anyio.wait_readable(sock)
            sock.recv(65536)
        sock.send(REFUSAL)
        sock.shutdown(socket.SHUT_WR)
        with anyio.move_on_after(REFUSAL_S / 2):
            while True:
                await anyio.wait_readable(sock)
                if not sock.recv(65536):
                    break
    except OSError:
        pass
    finally:
        sock.close()


class _Acceptor:
    def __init__(
        self,
        listener: socket.socket,
        serve_one: ServeOne,
        limits: Limits,
        stats: TransportStats,
        connections: TaskGroup,
    ) -> None:
        self.listener = listener
        self.serve_one = serve_one
        self.limits = limits
        self.stats = stats
        self.connections = connections
        self.refusing = 0
        self.out_of_fds = ThrottledLog(log)
        self.over_cap = ThrottledLog(log)

    async def run(self) -> None:
        while True:
            await anyio.wait_readable(self.listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _addr = self.listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _OUT_OF_RESOURCES:
                        self.stats.accept_errors += 1
                        self.out_of_fds.warning(
                            "cannot accept connections: %s (%d open; lower "
                            "server.max_connections or raise the descriptor limit)",
                            exc.strerror,
                            self.stats.open,
                        )
                        await anyio.sleep(ACCEPT_RETRY_S)
                    # Anything else (ECONNABORTED: the client gave up in the backlog)
                    # concerns that one connection only.
                    break
                sock.setblocking(False)
                self._dispatch(sock)
            await anyio.lowlevel.checkpoint()

    def _dispatch(self, sock: socket.socket) -> None:
        stats = self.stats
        if stats.open >= self.limits.max_connections:
            self.over_cap.warning(
                "%d connections open (server.max_connections): refusing new ones with 503",
                stats.open,
            )
            if self.refusing >= MAX_REFUSING:
                stats.dropped += 1
                sock.close()
                return
            stats.refused += 1
            self.refusing += 1
            self.connections.start_soon(self._refusal, sock)
            return
        stats.accepted += 1
        stats.open += 1
        self.connections.start_soon(self._serve, sock)

    async def _refusal(self, sock: socket.socket) -> None:
        try:
            await _refuse(sock)
        finally:
            self.refusing -= 1

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self.serve_one(sock)
        except Exception:  # one connection's failure is never the server's
            log.exception("connection failed")
        finally:
            self.stats.open -= 1
            sock.close()  # idempotent: normally closed by its transport already


async def _until_closed(stats: TransportStats, within: float) -> bool:
    """Wait up to ``within`` seconds for every connection to close; whether they did."""
    with anyio.move_on_after(within):
        while stats.open:  # noqa: ASYNC110 - counted by every connection; polled only at shutdown
            await anyio.sleep(0.02)
    return not stats.open


async def serve_connections(
    app: ASGIApp,
    listener: socket.socket,
    limits: Limits,
    stats: TransportStats,
    *,
    on_deadline: Callable[[], None] = lambda: None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listener`` (a bound, listening socket, which this closes) until
    cancelled. The cancellation is a graceful stop: no new connections, idle ones closed,
    in-flight requests get ``limits.graceful_timeout_s``; then ``on_deadline`` (streams
    send their error event, for ``FAREWELL_S``), then whatever is left is cancelled."""
    listener.setblocking(False)
    context = _worker_context()
    serve_one = _connection_runner(app, limits, stats, context)
    stop = anyio.Event()

    async def run() -> None:
        # Shielded: our caller's cancellation must reach no connection directly (it would
        # cut every request at once); it sets ``stop`` and the drain below takes over.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as connections:
                acceptor = _Acceptor(listener, serve_one, limits, stats, connections)
                accepting = anyio.CancelScope()
                accepted_all = anyio.Event()

                async def accept() -> None:
                    try:
                        with accepting:
                            await acceptor.run()
                    finally:
                        accepted_all.set()

                connections.start_soon(accept)
                await stop.wait()
                accepting.cancel()
                await accepted_all.wait()  # nobody waits on the listener when it closes
                listener.close()
                await context.terminated.set()  # type: ignore[attr-defined]
                if not await _until_closed(stats, limits.graceful_timeout_s):
                    on_deadline()
                    await _until_closed(stats, FAREWELL_S)
                connections.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()
