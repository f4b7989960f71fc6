"""One request's state inside a model worker, and the stream its caller reads."""

from __future__ import annotations

import codecs
import enum
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .events import CacheDelta, CacheHit, Completion, Done, FinishReason, Stats, Token
from .sampling import SamplerParams

__all__ = ["InferStream", "Request", "RequestState"]


class RequestState(enum.Enum):
    QUEUED = "queued"  # in the model's FIFO queue
    ADMITTING = "admitting"  # holds a sequence; cache lookup / restore under way
    RUNNING = "running"  # in the batch: prefilling or generating
    DONE = "done"  # Done (or an error) was delivered; the stream is closed


@attrs.frozen
class Failure:
    """Carried through the event channel so the reader raises ``exc`` in its own task."""

    exc: BaseException


Event = Token | Done | Failure


@attrs.define(eq=False)
class Request:
    """Mutable per-request state. Owned by the model's tick loop; other tasks only read it,
    set ``cancel_requested`` and wake the loop."""

    ref: str
    model_id: str
    prompt: tuple[int, ...]
    params: SamplerParams
    max_tokens: int | None
    parent_key: bytes | None
    #: Effective fingerprint at queueing time: every lookup and save of this request uses it.
    fingerprint: bytes
    send: MemoryObjectSendStream[Event]
    sampler: Any = None
    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    finished: anyio.Event = attrs.Factory(anyio.Event)
    state: RequestState = RequestState.QUEUED
    cancel_requested: bool = False
    #: Why it is being cancelled: "cancelled" (caller) or "shutdown" (engine/model closing).
    cancel_reason: str = "cancelled"
    seq: int | None = None
    #: Prompt tokens still to prefill, then ``cold_rest`` after the cold save point.
    cursor: list[int] = attrs.Factory(list)
    cold_rest: list[int] | None = None
    #: Every token now in the sequence's KV (restored + prefilled + generated).
    context: list[int] = attrs.Factory(list)
    generated: list[int] = attrs.Factory(list)
    decoder: codecs.IncrementalDecoder = attrs.Factory(
        lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    hit: CacheHit = attrs.Factory(lambda: CacheHit(kind="cold", prefix_len=0))
    #: Cache lookup result, filled by the admission task (None = cold).
    restore: Any = None
    #: Prompt tokens the assigned sequence's live KV (kept from its previous request)
    #: already holds; the cache is only asked for longer rows.
    live_len: int = 0
    lookup_done: bool = False
    created_keys: int = 0
    last_save_at: int = 0
    finish_key: str | None = None
    queued_at: float = attrs.Factory(time.monotonic)
    admitted_at: float | None = None
    prefill_done_at: float | None = None
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return bool(self.cursor) or bool(self.cold_rest)

    def emit(self, event: Event) -> None:
        """Deliver an event; a reader that went away cancels the request instead."""
        try:
            self.send.send_nowait(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.cancel_requested = True

    def stats(self, reason: FinishReason, now: float) -> Stats:
        admitted = self.admitted_at if self.admitted_at is not None else now
        prefill_end = self.prefill_done_at or now
        gen_s = max(0.0, now - prefill_end) if self.prefill_done_at else 0.0
        n = len(self.generated)
        return Stats(
            prompt_tokens=len(self.prompt),
            completion_tokens=n,
            cache_hit_kind=self.hit.kind,
            cache_delta=CacheDelta(read=self.hit.prefix_len, created=self.created_keys),
            finish_reason=reason,
            finish_key=self.finish_key,
            time_to_first_token_s=(
                self.first_token_at - admitted if self.first_token_at is not None else None
            ),
            queued_s=admitted - self.queued_at,
            prefill_s=max(0.0, prefill_end - admitted) if self.admitted_at else 0.0,
            generation_s=gen_s,
            tokens_per_s=(n / gen_s) if n and gen_s > 0 else None,
            context_tokens=len(self.context),
        )


class InferStream:
    """The events of one request: ``Token`` ... then one ``Done``.

    Iterate it with ``async for``. A backend failure raises its typed error from the
    iteration instead of a ``Done``. Use it as an async context manager (or call ``aclose``)
    so that leaving early cancels the request inside the model.
    """

    def __init__(
        self,
        ref: str,
        model_id: str,
        receive: MemoryObjectReceiveStream[Event],
        cancel: Callable[[], None],
    ) -> None:
        self.ref = ref
        self.model_id = model_id
        self._receive = receive
        self._cancel = cancel
        self.done: Done | None = None

    def cancel(self) -> None:
        """Cancel the request (idempotent). The stream still ends with Done("cancelled")."""
        self._cancel()

    def __aiter__(self) -> InferStream:
        return self

    async def __anext__(self) -> Token | Done:
        try:
            event = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(event, Failure):
            raise event.exc
        if isinstance(event, Done):
            self.done = event
        return event

    async def aclose(self) -> None:
        """Stop reading: cancels the request if it is still running."""
        if self.done is None:
            self._cancel()
        await self._receive.aclose()

    async def __aenter__(self) -> InferStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def collect(self) -> Completion:
        """Read to the end and assemble a :class:`Completion`."""
        parts: list[str] = []
        ids: list[int] = []
        try:
            async for event in self:
                if isinstance(event, Token):
                    parts.append(event.text)
                    ids.append(event.token_id)
        finally:
            # Leaving early (the caller's scope was cancelled, say) cancels the request.
            if self.done is None:
                self._cancel()
        done = self.done
        assert done is not None, "a stream ends with Done or raises"
        st = done.stats
        return Completion(
            text="".join(parts),
            token_ids=tuple(ids),
            finish_reason=done.finish_reason,
            finish_key=st.finish_key,
            cache_hit_kind=st.cache_hit_kind,
            cache_delta=st.cache_delta,
            stats=st,
        )
