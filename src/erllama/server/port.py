"""What the server needs from an engine: the calls its routes make, as a Protocol.

:class:`erllama.Engine` satisfies it, and so does ``erllama.ray``'s engine over a fleet of
replicas, so the same app serves one local engine (``erllama serve``) or many remote ones
(``erllama serve --ray``). Everything not listed here is none of the server's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol, Unpack

from ..cache.counters import CacheCounters
from ..config import ModelConfig
from ..events import Event, ModelInfo, ModelState
from ..lifecycle import KeepAlive
from ..options import RequestOptions
from ..pressure import PressureStatus

__all__ = ["EnginePort", "EventStream"]


class EventStream(Protocol):
    """One request's events (``Token`` ... then one ``Done``; a failure raises its typed
    error). Leaving it, or :meth:`aclose` before the end, cancels the request."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> EventStream: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class EnginePort(Protocol):
    """The engine calls the server makes (see :class:`erllama.Engine` for each one's
    contract; an implementation raises the same typed errors)."""

    def list_models(self) -> list[ModelInfo]: ...

    def model_info(self, model_id: str) -> ModelInfo: ...

    def model_states(self) -> list[ModelState]: ...

    def hold(
        self,
        model_id: str,
        *,
        keep_alive_s: float | KeepAlive | None = KeepAlive.DEFAULT,
        wait_s: float | None = None,
    ) -> AbstractAsyncContextManager[ModelInfo]: ...

    def cache_counters(self) -> CacheCounters: ...

    def pressure_status(self) -> PressureStatus: ...

    async def infer(
        self, model_id: str, prompt: str | Sequence[int], **options: Unpack[RequestOptions]
    ) -> EventStream: ...

    async def apply_chat_template(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]: ...

    async def tokenize(
        self, model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]: ...

    async def detokenize(
        self, model_id: str, tokens: Sequence[int], *, special: bool = False
    ) -> str: ...

    async def embed(self, model_id: str, prompt: str | Sequence[int]) -> list[float]: ...

    async def load_model(
        self,
        model_id: str | ModelConfig | None = None,
        config: ModelConfig | Mapping[str, Any] | None = None,
    ) -> str: ...

    async def unload(self, model_id: str) -> None: ...
