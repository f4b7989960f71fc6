"""Sessions: a request's sequence kept for the next request of the same session.

The first request with a ``session_id`` pins its sequence when it finishes; the next one
whose prompt extends what the sequence holds feeds only the rest on the live cells. The
table lives on the model thread; the loop reads :attr:`Sessions.info`, replaced whole.

A pinned sequence is released (after an evict save, so its state stays in the cache) by
``end_session``, when idle longer than ``ModelConfig.session_ttl_s``, when a request waits
for a sequence and only idle sessions hold them, and when the model unloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from ..events import SessionInfo

__all__ = ["Sessions"]


@attrs.define(eq=False)
class _Session:
    seq: int
    tokens: int
    idle_since: float | None


class Sessions:
    def __init__(self, on_change: Callable[[Sessions], None]) -> None:
        self._on_change = on_change
        self._table: dict[str, _Session] = {}
        #: Sessions to release when their running request ends (``end_session`` arrived
        #: while it ran).
        self.ending: set[str] = set()
        self.info: tuple[SessionInfo, ...] = ()

    def __contains__(self, session: object) -> bool:
        return session in self._table

    def pinned(self, session: str, seq: int, tokens: int) -> None:
        self._table[session] = _Session(seq, tokens, time.monotonic())
        self._changed()

    def running(self, session: str) -> None:
        s = self._table.get(session)
        if s is not None:
            s.idle_since = None
            self._changed()

    def dropped(self, session: str) -> int | None:
        """Forget ``session``; returns its sequence."""
        self.ending.discard(session)
        s = self._table.pop(session, None)
        self._changed()
        return None if s is None else s.seq

    def idle(self, *, older_than: float | None = None) -> list[str]:
        """Idle sessions, least recently used first (idle at least ``older_than`` s)."""
        now = time.monotonic()
        found = [
            (s.idle_since, name)
            for name, s in self._table.items()
            if s.idle_since is not None and (older_than is None or now - s.idle_since >= older_than)
        ]
        return [name for _, name in sorted(found)]

    def _changed(self) -> None:
        self.info = tuple(
            SessionInfo(id=name, tokens=s.tokens, idle_since=s.idle_since)
            for name, s in self._table.items()
        )
        self._on_change(self)
