"""Holding an engine open for a Ray Serve deployment's whole life.

Serve constructs a deployment in one task (``async __init__``) and destroys it in another
(``async __del__``), but anyio's task groups and cancel scopes must be left in the task
that entered them. So the engine is opened and closed by an owner task of its own, which
``__init__`` starts and waits for, and ``__del__`` stops. Replicas run on asyncio (uvloop),
never trio, so the owner is a plain asyncio task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

__all__ = ["Owner"]

T = TypeVar("T")


class Owner(Generic[T]):
    """Enters ``open()`` in a task of its own and keeps it entered until :meth:`stop`."""

    def __init__(self, open: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        self._open = open
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._value: T | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> T:
        """Open it; raises what opening raised."""
        self._task = asyncio.get_running_loop().create_task(self._own())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._task  # raises the failure
        if self._value is None:
            raise RuntimeError("the owner task ended before the resource opened")
        return self._value

    @property
    def alive(self) -> bool:
        """The resource is open (its owner task has not ended)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Close it (idempotent)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _own(self) -> None:
        async with self._open() as value:
            self._value = value
            self._ready.set()
            await self._stop.wait()
