"""Server-sent events (and Ollama's JSON lines), and noticing that a client went away.

Hand-written rather than sse-starlette: that package's shutdown watcher is a detached
asyncio task (it never starts on trio and outlives the response on asyncio), and an event
stream is a few lines. Each API's encoder is here; :class:`EventStreamResponse` sends them,
and :class:`NdjsonResponse` sends Ollama's ``application/x-ndjson`` the same way.

A client that disconnects must cancel its request inside the model. Hypercorn reports the
disconnect as an ``http.disconnect`` message; a response therefore listens for it beside
its work, on both loops (``Request.is_disconnected()`` never sees it on trio).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import attrs
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import ApiError
from .state import Latch

__all__ = [
    "EventStreamResponse",
    "NdjsonResponse",
    "Interruption",
    "NoResponse",
    "StreamGuard",
    "interruption_error",
    "anthropic_event",
    "ndjson_line",
    "openai_done",
    "openai_event",
    "typed_event",
    "unless_disconnected",
]

T = TypeVar("T")


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def openai_event(obj: Any) -> str:
    """A ``data:`` event (OpenAI streams carry no event names)."""
    return f"data: {_json(obj)}\n\n"


def openai_done() -> str:
    return "data: [DONE]\n\n"


def typed_event(obj: dict[str, Any]) -> str:
    """An event named by its ``type`` (Anthropic's and the Responses API's streams)."""
    return f"event: {obj['type']}\ndata: {_json(obj)}\n\n"


def anthropic_event(obj: dict[str, Any]) -> str:
    """An event named by its ``type``: the Anthropic SDK drops events without a name."""
    return typed_event(obj)


def ndjson_line(obj: Any) -> str:
    """One JSON object on one line (Ollama's streams)."""
    return _json(obj) + "\n"


class NoResponse(Response):
    """What a route returns when its client is gone: nothing is sent (a client that only
    half-closed its side would otherwise read it, and 499 is a log code, never a status
    to send). The metrics count it as 499."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


#: How a stream ended when it did not run to its end: the server stopped (its graceful
#: timeout ran out), or the client read so much slower than the model wrote that
#: ``server.stream_buffer_bytes`` filled up.
Interruption = Literal["stopping", "stalled"]


@attrs.frozen(kw_only=True)
class StreamGuard:
    """What bounds one event stream: the server's stop signal, how many bytes of events
    may wait for a slow client, and the dialect's error event for an interruption."""

    stopping: Latch
    buffer_bytes: int
    #: The dialect's error event (OpenAI ``data: {"error": ...}``, Anthropic
    #: ``event: error``) for an error.
    error_event: Callable[[ApiError], str]


def interruption_error(why: Interruption) -> ApiError:
    if why == "stopping":
        return ApiError(
            503,
            "unavailable",
            "the server is stopping; the request was cancelled",
            code="server_stopping",
        )
    return ApiError(
        503,
        "unavailable",
        "the client read too slowly: the request was cancelled (server.stream_buffer_bytes)",
        code="client_too_slow",
    )


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of encoded events.

    The events are read into a buffer as they come and written to the client from it:
    the engine's stream never waits for the client (it must not: the model thread steps
    every request at once), and the buffer is bounded. When the client disconnects, the
    iterator is cancelled where it waits (so each event must be awaited for, as the
    engine's stream is). When the buffer passes ``guard.buffer_bytes`` (a client that does
    not read), or the server stops, generation is cancelled, the dialect's error event is
    sent after what is buffered, and the response ends. ``cleanup`` then runs shielded,
    however the response ended, with how it was interrupted (None: it was not, or the
    client left): it must close the engine's stream (which cancels the request in the
    model) and record the outcome.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[str],
        cleanup: Callable[[Interruption | None], Awaitable[None]],
        guard: StreamGuard,
    ) -> None:
        # No Response.__init__: it would declare a Content-Length of the (empty) body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events = events
        self._cleanup = cleanup
        self._guard = guard
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._ready = anyio.Event()
        self._produced = False
        self.interrupted: Interruption | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    await _wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(listen)
                try:
                    await self._serve(send)
                except Exception as exc:  # raised below, not inside an exception group
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._cleanup(self.interrupted)
        if error is not None:
            raise error

    async def _serve(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with anyio.create_task_group() as tg:
            producing = anyio.CancelScope()

            async def produce() -> None:
                try:
                    with producing:
                        await self._produce(producing)
                finally:
                    self._produced = True
                    self._ready.set()

            async def stop() -> None:
                await self._guard.stopping.wait()
                self._interrupt("stopping", producing)

            tg.start_soon(produce)
            tg.start_soon(stop)
            await self._drain(send)
            tg.cancel_scope.cancel()
        if self.interrupted is not None:
            error = self._guard.error_event(interruption_error(self.interrupted))
            await send({"type": "http.response.body", "body": error.encode(), "more_body": True})
        if self.interrupted == "stalled":
            # Left unfinished, so the server closes the connection after it: a client that
            # does not read must not keep it (and its buffers) as an idle keep-alive one.
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _interrupt(self, why: Interruption, producing: anyio.CancelScope) -> None:
        if self.interrupted is None and not self._produced:
            self.interrupted = why
            producing.cancel()

    async def _produce(self, producing: anyio.CancelScope) -> None:
        async for event in self._events:
            data = event.encode()
            self._buffer.append(data)
            self._buffered += len(data)
            self._ready.set()
            if self._buffered > self._guard.buffer_bytes:
                self._interrupt("stalled", producing)
                return

    async def _drain(self, send: Send) -> None:
        """Write what is buffered, in order, until the producer is done and it is all out."""
        while True:
            if not self._buffer:
                if self._produced:
                    return
                await self._ready.wait()
                self._ready = anyio.Event()
                continue
            chunk = b"".join(self._buffer)
            self._buffer.clear()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._buffered -= len(chunk)
            # A send to a vanished client returns at once without yielding: this checkpoint
            # lets the disconnect be noticed however many events are buffered.
            await anyio.lowlevel.checkpoint()


class NdjsonResponse(EventStreamResponse):
    """``application/x-ndjson`` from an async iterator of lines (:func:`ndjson_line`), with
    the disconnect handling and ``cleanup`` of :class:`EventStreamResponse`."""

    media_type = "application/x-ndjson"


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work`` (after the body was read) unless the client disconnects first, which
    cancels it; None then. For non-streaming routes: nobody waits for the reply, so the
    model must stop."""
    result: T | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            await _wait_for_disconnect(request.receive)
            tg.cancel_scope.cancel()

        tg.start_soon(listen)
        try:
            result = await work()
        except Exception as exc:  # raised below, not inside an exception group
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result
