"""A thread-safe, non-blocking hand-off from native threads to the event loop.

A model's native thread must hand tokens to the loop without ever waiting for it. anyio's
own hand-offs block (``from_thread.run_sync``), and the loops' ones
(``call_soon_threadsafe``, ``run_sync_soon``) wake the loop with a ``send`` that releases the
GIL: the loop thread, woken by that very byte, takes the GIL first, and the model thread
then waits out the loop's whole turn before it can start the next forward pass. Measured on
2 cores, 2 llama.cpp threads: 178 us per token in asyncio's ``_write_to_self`` alone, about
3% of a 135M model's step; on a GPU, where a step takes a few milliseconds, far more.

So each :class:`LoopHandoff` has its own wake-up file descriptor (an eventfd on Linux, a
pipe elsewhere). ``post`` queues the call and, when no wake-up is pending, writes to it with
libc's ``write`` called through ``ctypes.PyDLL``, which keeps the GIL: the woken loop finds
the GIL held and waits until the model thread releases it in ``llama_decode``, by which time
the thread no longer needs it. (An eventfd write costs about 25 us there, a socket's 45.) A
task on the loop (:meth:`LoopHandoff.pump`, anyio's ``wait_readable``) runs the queued calls
in order. Nothing here depends on which event loop runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = ["LoopHandoff", "Mail"]

log = logging.getLogger("erllama.loop")

#: A call to run on the loop: a function and its arguments.
Mail = tuple[Callable[..., object], tuple[Any, ...]]


def _gil_keeping_write() -> Callable[[int, bytes, int], int]:
    """libc's ``write``, called without releasing the GIL (``PyDLL``); ``os.write`` (which
    releases it: correct, only slower) where there is no such symbol."""
    try:
        fn = ctypes.PyDLL(None).write
    except (OSError, AttributeError):  # pragma: no cover - every POSIX libc has write
        return lambda fd, data, n: os.write(fd, data[:n])
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    fn.restype = ctypes.c_ssize_t
    return fn


_write = _gil_keeping_write()


class _Waker:
    """A readable-when-woken file descriptor: an eventfd (one counter, the cheapest
    wake-up), or a non-blocking pipe where there is none."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.token = (1).to_bytes(8, sys.byteorder)
        else:  # pragma: no cover - not Linux
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
            self.token = b"\0"

    def wake(self) -> None:
        # Never blocks: a full pipe (or a saturated counter) already holds a wake-up.
        _write(self.wfd, self.token, len(self.token))

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.rfd, 4096) and self.rfd != self.wfd:
                pass

    def close(self) -> None:
        os.close(self.rfd)
        if self.wfd != self.rfd:  # pragma: no cover - not Linux
            os.close(self.wfd)


class LoopHandoff:
    """Runs callables on the event loop, from any thread, without waiting.

    The calls run in order, synchronously, inside :meth:`pump`'s task (shielded, so they run
    through a shutdown): they must be quick and must not raise; a raise is logged. ``post``
    returns False once the pump has ended, and the call does not run.
    """

    def __init__(self) -> None:
        self._waker = _Waker()
        self._calls: deque[Mail] = deque()
        self._lock = threading.Lock()
        #: A wake-up is pending (or the pump is about to look): no second write needed.
        self._signalled = False
        self._closing = False
        self._ended = False

    # ---- any thread ---------------------------------------------------------------------

    def post(self, fn: Callable[..., object], *args: Any) -> bool:
        """Queue ``fn(*args)`` for the loop; False when the pump has ended."""
        return self.post_all(((fn, args),))

    def post_all(self, calls: Iterable[Mail]) -> bool:
        """Queue several calls, one wake-up for all of them."""
        with self._lock:
            if self._ended:
                return False
            self._calls.extend(calls)
            if not self._signalled:
                self._signalled = True
                self._waker.wake()
        return True

    # ---- the loop -----------------------------------------------------------------------

    async def pump(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run posted calls until :meth:`close`; shielded, so a shutdown still delivers what
        its native thread sends while it ends."""
        try:
            with anyio.CancelScope(shield=True):
                task_status.started()
                while not self._closing:
                    await anyio.wait_readable(self._waker.rfd)
                    self._run_posted()
        finally:
            with self._lock:
                self._ended = True
                last = list(self._calls)
                self._calls.clear()
            _run(last)
            self._waker.close()

    def close(self) -> None:
        """On the loop: end the pump once it has run everything posted so far."""
        self._closing = True
        with self._lock:
            if not self._ended:
                self._signalled = True
                self._waker.wake()

    def _run_posted(self) -> None:
        # The wake-up consumed first, then the calls taken: a call posted after the take
        # finds ``_signalled`` clear and wakes the loop again, so none is left waiting.
        self._waker.clear()
        with self._lock:
            batch = list(self._calls)
            self._calls.clear()
            self._signalled = False
        _run(batch)


def _run(batch: list[Mail]) -> None:
    for fn, args in batch:
        try:
            fn(*args)
        except Exception:
            log.exception("callback %r failed on the event loop", fn)
