"""Calls from the event loop into a model's thread, and their answers.

A :class:`Call` runs a function on the model thread between steps, giving it the thread's
call side (:class:`~erllama.model.sides.OnThread`), and hands its result back to the loop. Its life: ``pending`` (queued) -> ``running`` -> ``done``, or ``withdrawn`` when
its caller was cancelled while it was still pending (it then never runs). A call that ran
keeps its effect even when its caller has gone: ``finish`` (run on the loop with the result)
completes it whether or not anyone still waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import anyio

if TYPE_CHECKING:
    from .sides import OnThread

__all__ = ["Call"]

T = TypeVar("T")
State = Literal["pending", "running", "done", "withdrawn"]


class Call(Generic[T]):
    def __init__(
        self,
        fn: Callable[[OnThread], Any],
        finish: Callable[[Any], T] | None = None,
    ) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._finish = finish
        self.state: State = "pending"
        self._done = anyio.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    # ---- on the model thread --------------------------------------------------------------

    def start(self) -> bool:
        """Claim the call for running; False when its caller withdrew it."""
        with self._lock:
            if self.state != "pending":
                return False
            self.state = "running"
        return True

    def run(self, on_thread: OnThread) -> tuple[Any, BaseException | None]:
        """Run it (after :meth:`start`); exceptions are answers, not failures of the thread."""
        try:
            return self._fn(on_thread), None
        except Exception as exc:
            return None, exc

    # ---- on the event loop ----------------------------------------------------------------

    def resolve(self, result: Any, error: BaseException | None) -> None:
        """Record the answer (on the loop); runs ``finish`` even if the caller is gone."""
        if error is None and self._finish is not None:
            try:
                result = self._finish(result)
            except Exception as exc:
                result, error = None, exc
        self._result, self._error = result, error
        self.state = "done"
        self._done.set()

    def withdraw(self) -> bool:
        """The caller gave up: a pending call never runs (True); a running one completes."""
        with self._lock:
            if self.state == "pending":
                self.state = "withdrawn"
                return True
        return False

    async def wait(self) -> T:
        """Wait for the answer; a cancelled caller withdraws the call if it has not started."""
        try:
            await self._done.wait()
        except BaseException:
            self.withdraw()
            raise
        if self._error is not None:
            raise self._error
        result: T = self._result
        return result
