"""What the event loop reads of a model's thread: frozen snapshots, replaced whole.

**The rule, stated once.** State on the model thread has one writer: the thread. The loop
never reads that state in place. What the loop needs (the adapter set and the fingerprint it
folds into keys, the sessions, the live KV prefixes, the last cache hit and the last use) the
thread publishes as a frozen :class:`ThreadView`, replacing the gate's reference whole; one
reference store is atomic under the GIL, so a reader that takes ``gate.view`` once reads one
consistent value, never a table mid-change. What is fixed once the model is loaded
(:class:`ModelFacts`) is published once, before the model serves.
"""

from __future__ import annotations

import attrs

from ..backends.types import LoadedModel
from ..events import AdapterInfo, CacheHit, SessionInfo
from .output import PieceCache
from .spans import Markers

__all__ = ["LivePrefix", "ModelFacts", "ThreadView"]


@attrs.frozen
class LivePrefix:
    """A free or pinned sequence's KV: its tokens (u32 LE) under an effective fingerprint."""

    tokens: bytes
    fingerprint: bytes


@attrs.frozen
class ThreadView:
    """The model thread's state as the loop may read it (see the module docstring)."""

    #: The adapter-folded fingerprint new requests run under.
    fingerprint: bytes = b""
    adapters: tuple[AdapterInfo, ...] = ()
    sessions: tuple[SessionInfo, ...] = ()
    live: tuple[LivePrefix, ...] = ()
    last_hit: CacheHit | None = None
    #: ``time.monotonic()`` of the last admission (the load, before any).
    last_used: float = 0.0


@attrs.frozen
class ModelFacts:
    """What a loaded model is, fixed for its life."""

    loaded: LoadedModel
    #: The model's own cache identity (adapters not folded in).
    fingerprint: bytes
    markers: Markers
    #: Token -> text bytes. Shared by every request's output, which runs on the model
    #: thread only; the loop never calls it.
    pieces: PieceCache
    n_seq: int
