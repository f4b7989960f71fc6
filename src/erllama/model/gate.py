"""The one door through which the event loop reaches a model's thread and native handle.

Three kinds of traffic go through a :class:`ModelGate`:

* **Calls on the thread** (:meth:`ModelGate.call`): a function run between steps with the
  thread's call side (evict, embed, adapter changes ...).
* **Native calls off the thread** (:meth:`ModelGate.native`): vocabulary-only hooks
  (tokenize, detokenize, the chat template, sampler construction) run on a worker thread,
  because they read nothing a step writes and must not wait behind a step. They use the
  native handle outside the model thread, so each is **counted**.
* **Intake** (:meth:`ModelGate.using`): a request on its way from ``infer`` to the queue.

**The invariant: native memory is never freed under a caller.** Every use of the handle off
the model thread holds a count from before it starts until after it returns. An unload first
closes the gate to new users (they get :class:`~erllama.errors.ModelUnloading`), then waits
for the count to reach zero, bounded by ``wait_s``; if it does not, the unload fails with
:class:`~erllama.errors.UnloadTimeout` and the model keeps serving. The thread, before it
frees the handle (an unload, a failure or the engine's end), closes the gate for good and
waits for the count the same way; if users remain past the bound it leaves the handle
allocated (a logged leak) rather than free it under them. Idleness (for the pressure
scheduler) counts users too.

The gate also carries what the thread publishes for the loop: the scheduler once the model
serves, :class:`~erllama.model.snapshot.ModelFacts` and the latest
:class:`~erllama.model.snapshot.ThreadView` (see :mod:`.snapshot` for the rule).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ..errors import ModelFailed, ModelNotFound, ModelUnloading
from ..events import ModelStatus
from .calls import Call
from .scheduler import Barrier, Scheduler, SchedulerClosed
from .snapshot import ModelFacts, ThreadView

if TYPE_CHECKING:
    from .request import Request
    from .sides import OnThread

__all__ = ["Command", "ModelGate", "UNLOAD_WAIT_S"]

T = TypeVar("T")

#: How long an unload waits for native calls in flight (a tokenize of a huge text, a chat
#: template) before it fails with UnloadTimeout. Such calls take milliseconds normally;
#: the bound only matters for pathological inputs.
UNLOAD_WAIT_S = 30.0

#: A command for the thread: a call, or a plain function run between steps.
Command = Call[Any] | Callable[[], None]


class ModelGate:
    """See the module docstring. ``status``, ``error`` and ``close`` belong to the loop;
    ``handle``, ``facts``, ``scheduler`` and ``view`` are written by the thread (each once,
    or replaced whole)."""

    def __init__(self, model_id: str, backend_name: str) -> None:
        self.model_id = model_id
        self._backend_name = backend_name
        self._lock = threading.Lock()
        self._unused = threading.Condition(self._lock)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        #: Set to wake the thread (a command, a request, a cancel).
        self.wake = threading.Event()
        self._closed = False  # the thread takes nothing more
        self._unloading = False  # no new users: an unload is waiting for the rest
        self._users = 0
        self._no_users: anyio.Event | None = None
        self.status: ModelStatus = "loading"
        self.error: BaseException | None = None
        self.handle: Any = None
        self.facts: ModelFacts | None = None
        self.scheduler: Scheduler[Request, Call[Any]] | None = None
        self.view = ThreadView()

    # ---- the serving check ----------------------------------------------------------------

    def check_serving(self, *, held: bool = False) -> None:
        """ModelFailed, ModelUnloading or ModelNotFound unless the model takes requests.
        ``held``: the caller holds a use (:meth:`using`), taken before any unload began,
        so an unload waiting for it does not refuse it."""
        if self.status == "failed":
            err = self.error
            detail = str(err) if err is not None else ""
            raise ModelFailed(self.model_id, self._backend_name, "serving", detail) from err
        if self._unloading and not held:
            raise ModelUnloading(self.model_id)
        if self._closed or self.scheduler is None or self.status == "unloading":
            raise ModelNotFound(self.model_id)

    @property
    def in_use(self) -> int:
        """Native calls and intakes in flight."""
        return self._users

    @property
    def unloading(self) -> bool:
        """An unload has begun (new users are refused), or the thread has closed the gate."""
        return self._unloading or self._closed

    # ---- users off the thread (the loop) ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[None]:
        """Count one user for the block; refused (see :meth:`check_serving`) once an unload
        has begun."""
        self._enter()
        try:
            yield
        finally:
            self._leave()

    async def native(self, fn: Callable[[Any], T], *, held: bool = False) -> T:
        """Run ``fn(handle)`` on a worker thread, counted. The wait is not abandoned on
        cancellation (the thread cannot be stopped), so the count covers the whole call.
        ``held``: as for :meth:`check_serving`."""
        self._enter(held)
        try:
            return await anyio.to_thread.run_sync(fn, self.handle)
        finally:
            self._leave()

    def _enter(self, held: bool = False) -> None:
        with self._lock:
            self.check_serving(held=held)
            self._users += 1

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            self._unused.notify_all()
            waiter, self._no_users = self._no_users, None
        if waiter is not None:
            waiter.set()

    # ---- unloading (the loop) -------------------------------------------------------------

    async def begin_unload(self, wait_s: float) -> bool:
        """Refuse new users, then wait up to ``wait_s`` for those in flight. True when none
        remain (the caller goes on to stop the thread); False (and the gate open again) when
        some still run. A failed model is refused to everyone already: nothing to wait for
        but the users it has."""
        with self._lock:
            self._unloading = True
        with anyio.move_on_after(wait_s):
            while True:
                with self._lock:
                    if not self._users:
                        return True
                    if self._no_users is None:
                        self._no_users = anyio.Event()
                    waiter = self._no_users
                await waiter.wait()
        with self._lock:
            self._unloading = False
        return False

    # ---- calls on the thread (the loop) ------------------------------------------------------

    def send(self, command: Command) -> None:
        """Queue a command for the thread (ModelNotFound once it has ended)."""
        with self._lock:
            if self._closed:
                raise ModelNotFound(self.model_id)
            self._commands.put(command)
        self.wake.set()

    async def call(
        self,
        fn: Callable[[OnThread], Any],
        *,
        exclusive: bool = False,
        finish: Callable[[Any], T] | None = None,
        starting: bool = False,
        held: bool = False,
    ) -> T:
        """Run ``fn`` on the model thread between steps. ``exclusive`` calls queue FIFO
        with requests and run while none is admitted (adapter changes). A caller cancelled
        before its call started withdraws it; one that started completes (``finish`` runs
        on the loop with its result either way). ``starting``: the model is not serving
        yet (the call that makes it serve). ``held``: as for :meth:`check_serving`."""
        if not starting:
            self.check_serving(held=held)
        c: Call[T] = Call(fn, finish)
        if not exclusive:
            self.send(c)
            return await c.wait()
        sched = self.scheduler
        assert sched is not None
        barrier: Barrier[Call[Any]] = Barrier(owner=c)
        try:
            sched.add_barrier(barrier)
        except SchedulerClosed:
            raise ModelNotFound(self.model_id) from None
        self.wake.set()
        try:
            return await c.wait()
        except BaseException:
            if c.state == "withdrawn":
                sched.withdraw_barrier(barrier)
            raise

    # ---- the thread's side --------------------------------------------------------------------

    def next_command(self) -> Command | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> list[Command]:
        """The thread stops taking commands: returns those still queued."""
        with self._lock:
            self._closed = True
        left = []
        while (cmd := self.next_command()) is not None:
            left.append(cmd)
        return left

    def wait_unused(self, wait_s: float) -> bool:
        """Block (on the model thread) until no user holds the handle, at most ``wait_s``;
        new users are refused from now on. True when none remain."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._closed = self._unloading = True
            while self._users:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._unused.wait(left)
        return True
