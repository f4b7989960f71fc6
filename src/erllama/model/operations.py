"""Operator calls on one model: evict and save-all, and sessions.

Saves are packed on the model thread between steps (a call through the gate) and handed to
the cache on the loop when the call completes, whether or not its caller still waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ..errors import InvalidRequest, ModelNotFound
from . import intake
from .gate import ModelGate
from .kv import SaveOrder

if TYPE_CHECKING:
    from .request import Request
    from .sides import OnThread, Orders

__all__ = ["Operations"]

#: Gives one packed state to the cache; returns its key, or None when it was dropped.
Store = Callable[["Request | None", SaveOrder], "bytes | None"]


class Operations:
    def __init__(self, gate: ModelGate, store: Store, session_ttl_s: float) -> None:
        self._gate = gate
        self._store = store
        self._ttl = session_ttl_s

    def _stored(self, orders: Orders) -> int:
        return sum(1 for req, order in orders if self._store(req, order) is not None)

    async def evict(self) -> int:
        """Evict-save every running request's sequence now (between steps); returns rows
        saved."""
        return await self._gate.call(lambda t: t.pack_running(), finish=self._stored)

    async def save_all(self) -> int:
        """Save every sequence that holds state now (reason ``evict``): running requests,
        pinned sessions and the live KV of idle sequences. Returns how many sequences'
        states the cache now holds."""
        return await self._gate.call(lambda t: t.pack_all(), finish=self._stored)

    async def end_session(self, session_id: str) -> None:
        """Release a session's sequence (after an evict save). Idempotent; a session whose
        request is running is released when that request ends."""
        self._gate.check_serving()
        session = intake.check_session(session_id)
        if session is None:
            raise InvalidRequest("session_id", "must be a non-empty string")

        def run(t: OnThread) -> None:
            t.release_session(session)

        await self._gate.call(run)

    async def expire_sessions(self) -> None:
        """Forever: release sessions idle longer than ``ModelConfig.session_ttl_s``."""
        ttl = self._ttl
        while True:
            await anyio.sleep(min(ttl / 2, 30.0))
            if not self._gate.view.sessions or self._gate.status != "idle":
                continue
            with contextlib.suppress(ModelNotFound):
                await self._gate.call(lambda t: t.expire_sessions(ttl))
