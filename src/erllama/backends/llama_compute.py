"""One thread computes for every llama.cpp model in the process.

llama-cpp-python built from source runs ggml's CPU graphs on OpenMP, and libgomp keeps one
team of threads per thread that opens a parallel region. erllama runs each model on a
thread of its own, so each loaded model brought a team: once the teams' threads outnumber
the cores, libgomp stops spinning between operations and llama.cpp's threads sleep and
wake at every one of them. A model's decode fell to 57% of its speed alone with a second
model merely loaded (bench scenario ``models``), and the same happens to plain
llama-cpp-python loops on two threads.

So every graph computation (a step's ``llama_decode``, an embedding) runs here, on one
thread, whatever model it is for: one team, sized by the largest ``n_threads``, however
many models are loaded. Models computing at the same time take turns step by step, which
costs nothing a second team would not have cost more (the cores were already shared).
The model thread that hands a computation over waits for it, so every rule that holds for
the model's handle on its own thread holds here (nothing frees it meanwhile). Everything
else (loading, tokenizing, state copies) stays where it was: none of it opens a parallel
region on the decode path.

``ModelConfig.options["compute_thread"] = "own"`` keeps a model's computations on its own
thread (the behaviour before; for measuring, and for a process that runs only one model
and wants to skip the hand-over, about 10 µs a step).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

__all__ = ["COMPUTE_MODES", "SharedCompute", "shared_compute"]

T = TypeVar("T")

COMPUTE_MODES: Final = ("shared", "own")


class _Call:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        # Held until the computation ends: the caller's acquire is its wait.
        self.done = threading.Lock()
        self.done.acquire()


class SharedCompute:
    """A daemon thread running the callables handed to :meth:`run`, one at a time, in the
    order they arrive. Started on first use; lives as long as the process."""

    def __init__(self, name: str = "erllama-compute") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ident: int | None = None

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the compute thread; its result, or its exception re-raised here."""
        if threading.get_ident() == self._ident:
            return fn()  # already there (a computation that computes)
        self._start()
        call = _Call(fn)
        self._queue.put(call)
        call.done.acquire()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def _start(self) -> None:
        if self._ident is not None:
            return
        with self._lock:
            if self._ident is None:
                started = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(started,), name=self._name, daemon=True
                )
                thread.start()
                started.wait()

    def _serve(self, started: threading.Event) -> None:
        self._ident = threading.get_ident()
        started.set()
        while True:
            call = self._queue.get()
            try:
                call.result = call.fn()
            except BaseException as exc:  # handed back to the caller, raised there
                call.error = exc
            finally:
                call.fn = _done
                call.done.release()


def _done() -> None:
    return None


_SHARED = SharedCompute()


def shared_compute() -> SharedCompute:
    """The process's compute thread."""
    return _SHARED
