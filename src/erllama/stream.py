"""The stream a caller reads one request's events from, and the channel that feeds it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import attrs

from .events import (
    Completion,
    Done,
    Event,
    ThinkingDelta,
    ThinkingEnd,
    Token,
    TokenLogprob,
    ToolCallEnd,
)

__all__ = ["Channel", "Failure", "InferStream"]


@attrs.frozen
class Failure:
    """Carried through a channel so the reader raises ``exc`` in its own task."""

    exc: BaseException


class Channel:
    """One request's events, pushed on the event loop, read by its :class:`InferStream`.

    Unbounded on purpose: a request never generates more than ``max_tokens`` (or its
    context), and the model thread must never wait for a slow reader. A reader that goes
    away cancels the request instead (see :class:`InferStream`).
    """

    __slots__ = ("_events", "_waiter", "closed")

    def __init__(self) -> None:
        self._events: deque[Event | Failure] = deque()
        self._waiter: anyio.Event | None = None
        self.closed = False

    def push(self, event: Event | Failure) -> None:
        self._events.append(event)
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def close(self) -> None:
        """No more events (the terminal one was pushed)."""
        self.closed = True
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def get(self) -> Event | Failure | None:
        """The next event, waiting for it; None once closed and drained."""
        # Buffered events are returned without yielding to the loop (one wake-up delivers a
        # whole step's worth), but a cancelled reader still notices at once.
        await anyio.lowlevel.checkpoint_if_cancelled()
        while not self._events:
            if self.closed:
                return None
            waiter = self._waiter = anyio.Event()
            await waiter.wait()
        return self._events.popleft()


class InferStream:
    """The events of one request: ``Token`` ... then exactly one ``Done``.

    A backend failure raises its typed error from the iteration instead of a ``Done``.

    The stream owns its request. Leaving it early cancels the request inside the model
    within one step: leaving ``async with stream``, calling :meth:`aclose`, leaving an
    ``async for`` loop over it before its ``Done`` (``break``, ``return``, an exception), or
    dropping the stream unread. To read in pieces without that, call :meth:`receive`.
    """

    def __init__(
        self,
        ref: str,
        model_id: str,
        channel: Channel,
        cancel: Callable[[], None],
        abandon: Callable[[], None],
    ) -> None:
        self.ref = ref
        self.model_id = model_id
        self._channel = channel
        self._cancel = cancel
        #: Thread-safe cancel, for finalizers (which may run on any thread).
        self._abandon = abandon
        self.done: Done | None = None
        self._failed = False
        self._closed = False

    @property
    def ended(self) -> bool:
        """The terminal event (``Done`` or a raised error) has been read, or it was closed."""
        return self.done is not None or self._failed or self._closed

    def cancel(self) -> None:
        """Cancel the request (idempotent). The stream still ends with Done("cancelled")."""
        self._cancel()

    async def receive(self) -> Token | Event:
        """The next event; raises StopAsyncIteration after the terminal one, or the
        request's typed error. Never cancels the request by itself."""
        if self._closed:
            raise StopAsyncIteration
        event = await self._channel.get()
        if event is None:
            raise StopAsyncIteration
        if isinstance(event, Failure):
            self._failed = True
            raise event.exc
        if isinstance(event, Done):
            self.done = event
        return event

    #: ``anext(stream)`` reads one event, like :meth:`receive`.
    __anext__ = receive

    def __aiter__(self) -> _Reader:
        return _Reader(self)

    async def aclose(self) -> None:
        """Stop reading: cancels the request if it has not ended."""
        if not self.ended:
            self._cancel()
        self._closed = True

    async def __aenter__(self) -> InferStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self.ended:
            self._abandon()

    async def collect(self) -> Completion:
        """Read to the end and assemble a :class:`Completion`."""
        text: list[str] = []
        thinking: list[str] = []
        signature: str | None = None
        tool_calls: list[str] = []
        logprobs: list[tuple[TokenLogprob, tuple[TokenLogprob, ...]]] = []
        try:
            while True:
                try:
                    event = await self.receive()
                except StopAsyncIteration:
                    break
                if isinstance(event, Token):
                    text.append(event.text)
                    if event.logprob is not None:
                        logprobs.append((event.logprob, event.top_logprobs))
                elif isinstance(event, ThinkingDelta):
                    thinking.append(event.text)
                elif isinstance(event, ThinkingEnd):
                    signature = event.signature
                elif isinstance(event, ToolCallEnd):
                    tool_calls.append(event.text)
        finally:
            # Leaving early (the caller's scope was cancelled, say) cancels the request.
            if not self.ended:
                self._cancel()
        done = self.done
        assert done is not None, "a stream ends with Done or raises"
        return Completion.build(
            done,
            "".join(text),
            thinking="".join(thinking),
            thinking_signature=signature,
            tool_calls=tuple(tool_calls),
            logprobs=tuple(logprobs),
        )


class _Reader:
    """What ``async for`` iterates. Dropped before the stream ended (a ``break`` out of the
    loop, an exception in its body), it cancels the request: ``async for`` gives no other
    sign that its reader has gone."""

    __slots__ = ("_stream",)

    def __init__(self, stream: InferStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> Any:
        return await self._stream.receive()

    def __del__(self) -> None:
        stream = self._stream
        if not stream.ended:
            stream._abandon()
