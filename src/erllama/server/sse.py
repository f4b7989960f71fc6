"""Server-sent events, and noticing that a client went away.

Hand-written rather than sse-starlette: that package's shutdown watcher is a detached
asyncio task (it never starts on trio and outlives the response on asyncio), and an event
stream is a few lines. Each API's encoder is here; :class:`EventStreamResponse` sends them.

A client that disconnects must cancel its request inside the model. Hypercorn reports the
disconnect as an ``http.disconnect`` message; a response therefore listens for it beside
its work, on both loops (``Request.is_disconnected()`` never sees it on trio).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = [
    "EventStreamResponse",
    "NoResponse",
    "anthropic_event",
    "openai_done",
    "openai_event",
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


def anthropic_event(obj: dict[str, Any]) -> str:
    """An event named by its ``type``: the Anthropic SDK drops events without a name."""
    return f"event: {obj['type']}\ndata: {_json(obj)}\n\n"


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


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of encoded events.

    When the client disconnects, the iterator is cancelled where it waits (so each event
    must be awaited for, as the engine's stream is). ``cleanup`` then runs shielded,
    however the response ended: it must close the engine's stream (which cancels the
    request in the model) and record the outcome.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        # No Response.__init__: it would declare a Content-Length of the (empty) body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events = events
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    await _wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(listen)
                try:
                    await self._send_all(send)
                except Exception as exc:  # raised below, not inside an exception group
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._cleanup()
        if error is not None:
            raise error

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for event in self._events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            # A send to a vanished client returns at once without yielding: this checkpoint
            # lets the disconnect be noticed however many events are buffered.
            await anyio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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
