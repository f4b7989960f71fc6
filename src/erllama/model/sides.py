"""The two narrow sides between a model's event-loop half and its thread.

* :class:`LoopSide`: what the thread tells the loop. Every method is posted through the
  hand-off and runs on the loop, in order; the worker implements it.
* :class:`OnThread`: what a call sent through the gate may do on the thread, between steps;
  the thread implements it.

Neither side sees the other's object: the thread holds a ``LoopSide``, a call holds an
``OnThread``, and nothing but the package face imports :mod:`.worker`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..backends.types import LoadedModel
from ..events import FinishReason

if TYPE_CHECKING:
    from ..cache.key import Namespace
    from .adapters import AdapterSet
    from .kv import SaveOrder
    from .request import Request

__all__ = ["LoopSide", "OnThread", "Orders"]

#: Saves packed on the thread, each with the request it belongs to (None: a sequence no
#: request holds, such as a session's or an idle sequence's live KV).
Orders = list[tuple["Request | None", "SaveOrder"]]


class LoopSide(Protocol):
    """What the model thread posts to the event loop."""

    def loaded(self, loaded: LoadedModel | None, error: BaseException | None) -> None:
        """The load ended: the model, or why it failed."""

    def exited(self) -> None:
        """The thread has freed the model (or never had one) and ends."""

    def model_failed(self, error: BaseException) -> None:
        """The model's state is in doubt: it serves nothing more."""

    def lookup(self, req: Request) -> None:
        """``req`` was admitted: find its best cache row, then answer with a restore."""

    def save(self, req: Request | None, order: SaveOrder) -> None:
        """Give a packed state to the cache (a cold, continued or evict save)."""

    def finished(self, req: Request, reason: FinishReason, order: SaveOrder | None) -> None:
        """``req`` ended normally; ``order`` is its finish save, written before ``Done``."""

    def failed(self, req: Request, error: BaseException) -> None:
        """``req`` ended with ``error``."""


class OnThread(Protocol):
    """What a call through the gate may use on the model thread."""

    @property
    def handle(self) -> Any:
        """The backend's native handle (safe here: the thread owns it)."""

    @property
    def adapters(self) -> AdapterSet: ...

    def begin(
        self, fingerprint: bytes, namespace: Callable[[bytes], Namespace], n_seq: int
    ) -> None:
        """Start serving under the model's identity."""

    def pack_running(self) -> Orders:
        """Evict-save every running request's sequence."""

    def pack_all(self) -> Orders:
        """Save every sequence that holds state: running requests, pins, live KV."""

    def release_session(self, session: str) -> None:
        """Unpin ``session``'s sequence after an evict save (at once when idle, else when
        its request ends)."""

    def expire_sessions(self, ttl_s: float) -> None:
        """Release the sessions idle longer than ``ttl_s``."""
