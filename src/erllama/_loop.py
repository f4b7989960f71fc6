"""The one place that knows which event loop runs: a thread-safe, non-blocking hand-off.

Everything else in erllama is anyio-only. A model's native thread must hand tokens to the
loop without ever waiting for it, and anyio offers only blocking hand-offs
(``from_thread.run_sync``), so this module picks the loop's own primitive once, when a model
starts: asyncio's ``loop.call_soon_threadsafe`` or trio's ``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import sniffio

__all__ = ["LoopHandoff"]

log = logging.getLogger("erllama.loop")


class LoopHandoff:
    """Runs callables on the event loop that created it, from any thread, without waiting.

    Callbacks run in the loop's own context (no task, no cancel scope): they must be quick,
    synchronous and must not raise; a raise is logged here, because on trio it would crash
    the run.
    """

    def __init__(self) -> None:
        library = sniffio.current_async_library()
        self._closed: tuple[type[BaseException], ...]
        if library == "trio":
            import trio

            self._post: Callable[..., Any] = trio.lowlevel.current_trio_token().run_sync_soon
            self._closed = (trio.RunFinishedError,)
        elif library == "asyncio":
            self._post = asyncio.get_running_loop().call_soon_threadsafe
            self._closed = (RuntimeError,)  # "Event loop is closed"
        else:  # pragma: no cover - anyio supports only these two
            raise RuntimeError(f"unsupported event loop {library!r}")
        self.library = library

    def post(self, fn: Callable[..., object], *args: Any) -> bool:
        """Schedule ``fn(*args)`` on the loop; False when the loop has already finished."""
        try:
            self._post(_guarded, fn, args)
        except self._closed:
            return False
        return True


def _guarded(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("callback %r failed on the event loop", fn)
