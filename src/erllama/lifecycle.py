"""The models an engine knows, and when each is loaded: Ollama's model lifecycle.

The engine knows every model of ``EngineConfig.models`` (and those of ``register_model``
and ``load_model``) whether it is loaded or not. A known model that is not loaded loads on
its first use: concurrent callers wait for the same load, which runs in the engine's task
group (a caller that stops waiting never cancels it). It unloads again

* once idle for its keep-alive (``ModelConfig.keep_alive_s``, or the override of its last
  use: Ollama's ``keep_alive``; None keeps it loaded for good, 0 unloads it as soon as
  nothing uses it), timed from its last use;
* when another model must load and ``EngineConfig.max_loaded_models`` are loaded: the least
  recently used idle one goes first; with none idle the load waits until one is;
* under memory pressure (the pressure scheduler, which unloads through the same path and
  runs a round before every load on demand when it is enabled).

Every such unload saves the model's live state first (``Engine.save_all``), so its cache
rows outlive the weights: a request after the reload restores from the cache instead of
prefilling cold. Cache rows belong to the engine's cache, not to the model.

**Holds.** Every engine call that uses a model (``infer``, ``tokenize``, a chat template
...) holds it from before it starts until it returns, and a request keeps its model busy
until it ends; ``Engine.hold`` holds one across several calls (the server holds a model for
a whole HTTP request). A held or busy model is never unloaded by the lifecycle or the
pressure scheduler, so nothing is unloaded between a server's chat-template render and the
request it builds. An explicit ``Engine.unload`` still unloads at once (calls then in
flight end as they always did: ``ModelUnloading``, ``cancelled``).

A model with LoRA adapters attached is never unloaded by its keep-alive or to make room:
adapters are not re-attached after a reload, so requests would silently run without them.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.abc import TaskStatus

from .config import ModelConfig
from .errors import ModelAlreadyLoaded, ModelLoading, ModelNotFound, ModelUnloading
from .events import LifecycleState, ModelInfo, ModelState
from .pressure.scheduler import unload_if_idle

if TYPE_CHECKING:
    from .engine import Engine
    from .model import ModelWorker

__all__ = ["KeepAlive", "Lifecycle", "POLL_S"]

log = logging.getLogger("erllama.engine")

#: How often the expiry task looks again at a model whose keep-alive has passed while it
#: was still in use (a safety net: the end of every use wakes it anyway).
POLL_S = 1.0


class KeepAlive(enum.Enum):
    """The keep-alive a use sets when it names no number of seconds."""

    #: The model's configured ``keep_alive_s`` (what a request without ``keep_alive`` gets).
    DEFAULT = "default"
    #: Whatever rule is in force (the engine's own calls: they do not change it).
    UNCHANGED = "unchanged"


class _Abandoned(Exception):
    """A load nobody waits for any more gave up waiting for room."""


@attrs.define(eq=False)
class _Load:
    """One load of a model, awaited by every caller that wants it."""

    done: anyio.Event = attrs.Factory(anyio.Event)
    error: BaseException | None = None
    #: ``room`` while it waits for a loaded model to become idle, then ``loading``.
    phase: str = "room"


@attrs.define(eq=False)
class Known:
    """One model the engine knows (event loop only)."""

    id: str
    config: ModelConfig
    configured: bool
    keep_alive_s: float | None
    holds: int = 0
    #: The lifecycle clock's time of the last use, and the Unix time of it.
    last_used: float | None = None
    last_used_at: float | None = None
    loaded_at: float | None = None
    load: _Load | None = None
    loads: int = 0
    unloads: Counter[str] = attrs.Factory(Counter)
    last_error: str | None = None
    #: The last snapshot taken before an unload.
    info: ModelInfo | None = None


@attrs.frozen
class Hold:
    """A use of a model: released with :meth:`Lifecycle.release`."""

    entry: Known
    worker: ModelWorker


_STATES: dict[str, LifecycleState] = {
    "loading": "loading",
    "unloading": "unloading",
    "failed": "failed",
}


def _usable(worker: ModelWorker) -> bool:
    """Serving, or failed (its calls raise ModelFailed until it is unloaded): not loading,
    and not being unloaded."""
    if worker.state == "failed":
        return True
    return worker.state != "loading" and not worker.closing


def _rule(value: float | None) -> float | None:
    if value is None or value < 0 or value == math.inf:
        return None
    return float(value)


class Lifecycle:
    """The engine's known models and their loads and unloads. Built by the engine; not
    public (the engine's methods are)."""

    def __init__(
        self,
        engine: Engine,
        max_loaded: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.max_loaded = max_loaded
        #: Seconds, monotonic (a test may set another clock; the expiry task sleeps for the
        #: differences it reads on it).
        self.clock = clock
        self.known: dict[str, Known] = {}
        #: Counts loads, unloads and ends of uses (what may let a waiter go on: callers
        #: waiting for a load, a load waiting for room); an event exists only while
        #: someone waits, so a busy model's calls cost an increment, not an event.
        self._generation = 0
        self._waiter: anyio.Event | None = None
        #: Wakes the expiry task when a keep-alive may run out before it meant to wake.
        self._expiry = anyio.Event()
        self._wake_at = -math.inf  # the expiry task's next check, on ``clock``
        self._room = anyio.Lock()
        self._expiring = anyio.Lock()
        self._scope: anyio.CancelScope | None = None

    # ---- the registry -----------------------------------------------------------------------

    def register(self, model_id: str, config: ModelConfig, *, configured: bool) -> Known:
        entry = Known(model_id, config, configured, _rule(config.keep_alive_s))
        self.known[model_id] = entry
        return entry

    def forget(self, model_id: str) -> None:
        self.known.pop(model_id, None)
        self._notify()

    # ---- uses ----------------------------------------------------------------------------------

    async def acquire(
        self, model_id: str, keep_alive: float | KeepAlive | None, wait_s: float | None
    ) -> Hold:
        """Hold ``model_id``, loading it first if it is not loaded; ModelNotFound for a model
        the engine does not know, ModelLoading past ``wait_s``, the load's own error if it
        failed. The hold keeps the model loaded until :meth:`release`."""
        entry = self.known.get(model_id)
        if entry is None or self._engine._closed:
            raise ModelNotFound(model_id)
        entry.holds += 1
        try:
            worker = self._serving(entry)
            if worker is None:
                if wait_s is None:
                    worker = await self._ready(entry)
                else:
                    with anyio.move_on_after(wait_s):
                        worker = await self._ready(entry)
                    if worker is None:
                        load = entry.load
                        why = "loading"
                        if load is not None and load.phase == "room":
                            why = (
                                f"waiting for one of the max_loaded_models ({self.max_loaded}) "
                                "loaded models to become idle"
                            )
                        raise ModelLoading(model_id, wait_s, why)
        except BaseException:
            entry.holds -= 1
            self._notify()
            raise
        if keep_alive is KeepAlive.DEFAULT:
            entry.keep_alive_s = _rule(entry.config.keep_alive_s)
        elif keep_alive is not KeepAlive.UNCHANGED:
            entry.keep_alive_s = _rule(keep_alive)
        self._touch(entry)  # a new hold lets no waiter go on: nobody to wake
        return Hold(entry, worker)

    def hold_now(self, model_id: str) -> Hold | None:
        """:meth:`acquire` for a model serving now, without waiting and without changing
        its keep-alive rule (the engine's own calls); None when it is not (then call
        :meth:`acquire`, which loads it or raises)."""
        entry = self.known.get(model_id)
        if entry is None or self._engine._closed:
            return None
        worker = self._serving(entry)
        if worker is None:
            return None
        entry.holds += 1
        self._touch(entry)
        return Hold(entry, worker)

    def release(self, hold: Hold) -> None:
        """End a use: the model's keep-alive runs from now."""
        hold.entry.holds -= 1
        self._touch(hold.entry)
        self._notify()

    def used(self, model_id: str) -> None:
        """A request of the model ended: its keep-alive runs from now."""
        entry = self.known.get(model_id)
        if entry is not None:
            self._touch(entry)
            self._notify()

    def _touch(self, entry: Known) -> None:
        """A use now. The expiry task is woken only if this keep-alive runs out before its
        next check (a use moves a deadline later, except when it shortens the rule), so a
        busy model's calls do not wake it each time."""
        entry.last_used = self.clock()
        entry.last_used_at = time.time()
        deadline = self._deadline(entry)
        if deadline is not None and deadline < self._wake_at:
            self._wake_at = -math.inf
            self._expiry.set()

    def _notify(self) -> None:
        self._generation += 1
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    async def _changed_since(self, generation: int) -> None:
        """Return once anything changed after ``generation`` was read (at once if it has)."""
        if self._generation != generation:
            return
        if self._waiter is None:
            self._waiter = anyio.Event()
        await self._waiter.wait()

    def _serving(self, entry: Known) -> ModelWorker | None:
        worker = self._engine._models.get(entry.id)
        return worker if worker is not None and _usable(worker) else None

    async def _ready(self, entry: Known) -> ModelWorker:
        """Wait until the model serves (or has failed), starting its load if nobody has."""
        engine = self._engine
        while True:
            if engine._closed or self.known.get(entry.id) is not entry:
                raise ModelNotFound(entry.id)
            seen = self._generation
            worker = engine._models.get(entry.id)
            if worker is not None:
                if _usable(worker):
                    return worker
                if worker.closing and not entry.configured:
                    raise ModelUnloading(entry.id)  # and then forgotten: nothing to wait for
                # An explicit load, or an unload, settling: a configured model being
                # unloaded is loaded again once it is gone.
                await self._changed_since(seen)
                continue
            load = entry.load
            if load is None:
                load = entry.load = _Load()
                engine._tg.start_soon(self._load_in_background, entry, load)
            await load.done.wait()
            if load.error is not None:
                raise load.error

    # ---- loading -------------------------------------------------------------------------------

    async def load(self, model_id: str, config: ModelConfig) -> None:
        """An explicit load (``Engine.load_model``), in the caller's task: it waits for room
        as long as the caller does. A model new to the engine that fails to load is
        forgotten again."""
        entry = self.known.get(model_id)
        if entry is not None and entry.load is not None:
            raise ModelAlreadyLoaded(model_id)
        new = entry is None
        if entry is None:
            entry = self.register(model_id, config, configured=False)
        else:
            entry.config = config
            entry.keep_alive_s = _rule(config.keep_alive_s)
        load = entry.load = _Load()
        entry.holds += 1
        try:
            await self._load(entry, load, lazy=False)
        except BaseException:
            if new and self.known.get(model_id) is entry:
                self.known.pop(model_id)
            raise
        finally:
            entry.holds -= 1
            self._touch(entry)

    async def _load_in_background(self, entry: Known, load: _Load) -> None:
        try:
            await self._load(entry, load, lazy=True)
        except _Abandoned:
            log.info("model %s: load abandoned (nobody waits for it any more)", entry.id)
        except Exception:
            pass  # every waiter gets it (load.error); the log has it

    async def _load(self, entry: Known, load: _Load, *, lazy: bool) -> None:
        engine = self._engine
        try:
            async with self._room:
                await self._make_room(entry, lazy=lazy)
                load.phase = "loading"
                pressure = engine._pressure
                if lazy and pressure.config.enabled:
                    # A machine already short of memory frees some (cache rows, then idle
                    # models) before a model loads on demand. The new model's own size is
                    # not predicted: the next rounds see it. (An explicit load_model is
                    # the caller's decision, as before.)
                    await pressure.check()
                worker = engine._new_worker(entry.id, entry.config)
            await engine._start_worker(worker)
        except _Abandoned:
            raise
        except Exception as exc:
            load.error = exc
            entry.last_error = f"{type(exc).__name__}: {exc}"
            if lazy:
                log.warning("model %s: loading on demand failed: %s", entry.id, exc)
            raise
        else:
            entry.loads += 1
            entry.loaded_at = time.time()
            entry.last_error = None
            self._touch(entry)
        finally:
            if entry.load is load:
                entry.load = None
            load.done.set()
            self._notify()

    async def _make_room(self, entry: Known, *, lazy: bool) -> None:
        """Unload least recently used idle models until one more may load; with none idle,
        wait for one (a load nobody waits for any more gives up)."""
        limit = self.max_loaded
        models = self._engine._models
        while limit is not None:
            seen = self._generation
            if sum(1 for m in models if m != entry.id) < limit:
                return
            if lazy and entry.holds == 0:
                raise _Abandoned  # unload nothing for a load nobody waits for
            for victim in self.idle_by_age(exclude=entry.id):
                if await self.unload_if_idle(victim, "max_loaded_models"):
                    break
            else:
                await self._changed_since(seen)

    # ---- unloading ------------------------------------------------------------------------------

    def is_idle(self, model_id: str, *, adapters_ok: bool = False) -> bool:
        """Loaded, and nothing of it runs, is queued, is being admitted or holds it; with
        ``adapters_ok`` False, no adapter attached either."""
        engine = self._engine
        worker = engine._models.get(model_id)
        if worker is None or engine._closed or not worker.idle:
            return False
        entry = self.known.get(model_id)
        if entry is not None and entry.holds:
            return False
        return adapters_ok or not worker.gate.view.adapters

    def idle_by_age(self, *, exclude: str | None = None, adapters_ok: bool = False) -> list[str]:
        """Idle models (see :meth:`is_idle`), least recently used first."""
        idle = [
            m
            for m in self._engine._models
            if m != exclude and self.is_idle(m, adapters_ok=adapters_ok)
        ]
        return sorted(idle, key=self._age)

    def _age(self, model_id: str) -> float:
        entry = self.known.get(model_id)
        if entry is None or entry.last_used is None:
            return -math.inf
        return entry.last_used

    async def unload_if_idle(self, model_id: str, reason: str) -> bool:
        """Evict-save every sequence's state, then unload, if the model is idle (the
        pressure scheduler's path); True when it was unloaded."""
        return await unload_if_idle(_Pool(self, reason), model_id, reason)

    async def unload_worker(self, model_id: str, reason: str) -> None:
        """Unload a loaded model, keeping it known (its next use loads it again)."""
        engine = self._engine
        worker = engine._models.get(model_id)
        if worker is None or worker.state == "loading":
            raise ModelNotFound(model_id)
        entry = self.known.get(model_id)
        if entry is not None:
            entry.info = worker.info()
        try:
            await engine._close_worker(model_id, worker)
        finally:
            if engine._models.get(model_id) is not worker and entry is not None:
                entry.unloads[reason] += 1
                entry.loaded_at = None
            self._notify()

    async def unload(self, model_id: str) -> None:
        """An explicit unload (``Engine.unload``): a model ``load_model`` brought in is
        forgotten; a configured one stays known."""
        await self.unload_worker(model_id, "unload")
        entry = self.known.get(model_id)
        if entry is not None and not entry.configured and model_id not in self._engine._models:
            self.forget(model_id)

    # ---- keep-alive expiry -----------------------------------------------------------------------

    def _deadline(self, entry: Known) -> float | None:
        if entry.keep_alive_s is None or entry.last_used is None:
            return None
        return entry.last_used + entry.keep_alive_s

    async def expire(self) -> list[str]:
        """Unload every idle model whose keep-alive has passed; returns their ids."""
        async with self._expiring:
            now = self.clock()
            gone = []
            for entry in list(self.known.values()):
                deadline = self._deadline(entry)
                if deadline is None or deadline > now or entry.id not in self._engine._models:
                    continue
                if await self.unload_if_idle(entry.id, "keep_alive"):
                    gone.append(entry.id)
            return gone

    def _next_check(self) -> float:
        """Seconds until the next keep-alive runs out: 0 when one has run out on a model
        that is idle now (its use ended during the last check), POLL_S when one has run
        out on a model still in use (the end of each use wakes the task anyway); infinite
        when none will."""
        now = self.clock()
        wait = math.inf
        for entry in self.known.values():
            deadline = self._deadline(entry)
            if deadline is None or entry.id not in self._engine._models:
                continue
            if deadline > now:
                wait = min(wait, deadline - now)
            elif self.is_idle(entry.id):
                return 0.0
            else:
                wait = min(wait, POLL_S)
        return wait

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The expiry task: check when a keep-alive runs out, and whenever a use ends."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            while True:
                self._expiry = anyio.Event()
                try:
                    await self.expire()
                except Exception:
                    log.exception("keep-alive expiry failed")
                delay = self._next_check()
                self._wake_at = self.clock() + delay
                with anyio.move_on_after(delay):
                    await self._expiry.wait()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._wake_at = -math.inf
        self._notify()

    # ---- the view ---------------------------------------------------------------------------------

    def states(self) -> list[ModelState]:
        engine = self._engine
        out = []
        for entry in self.known.values():
            worker = engine._models.get(entry.id)
            state: LifecycleState
            info = entry.info
            if entry.load is not None:
                # A load on its way: "loaded" only once it has been counted (its worker
                # may serve a moment before the load's own bookkeeping has run).
                state = "loading"
            elif worker is not None:
                state = _STATES.get(worker.state, "loaded")
                if state != "loading":
                    info = worker.info()
            else:
                state = "unloaded"
            expires = None
            if state == "loaded" and entry.keep_alive_s is not None and entry.last_used_at:
                expires = entry.last_used_at + entry.keep_alive_s
            out.append(
                ModelState(
                    id=entry.id,
                    state=state,
                    keep_alive_s=entry.keep_alive_s,
                    last_used_at=entry.last_used_at,
                    expires_at=expires,
                    loaded_at=entry.loaded_at if worker is not None else None,
                    configured=entry.configured,
                    holds=entry.holds,
                    loads=entry.loads,
                    unloads=dict(entry.unloads),
                    last_error=entry.last_error,
                    info=info,
                )
            )
        return out


class _Pool:
    """The engine's models as :func:`unload_if_idle` sees them, for the lifecycle: the save
    before an unload is every sequence's state (``save_all``), not only running ones."""

    def __init__(self, lifecycle: Lifecycle, reason: str) -> None:
        self._lifecycle = lifecycle
        self.reason = reason

    def unload_candidates(self) -> list[str]:
        return self._lifecycle.idle_by_age()

    def is_idle(self, model_id: str) -> bool:
        return self._lifecycle.is_idle(model_id)

    async def evict(self, model_id: str) -> int:
        return await self._lifecycle._engine.save_all(model_id)

    async def unload(self, model_id: str) -> None:
        await self._lifecycle.unload_worker(model_id, self.reason)
