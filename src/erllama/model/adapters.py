"""A model's LoRA adapter set and the fingerprint it folds into the cache key.

Changed only on the model thread, by exclusive calls that run while no request is admitted,
so a request is computed with the set (and keyed with the fingerprint) it was admitted
under. After every change the set hands itself to ``on_change``, which publishes its
:attr:`AdapterSet.info` and :attr:`AdapterSet.fingerprint` for the loop (see
:mod:`.snapshot`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..cache.key import effective_fingerprint
from ..errors import InvalidRequest
from ..events import AdapterInfo
from ..fingerprint import file_sha256
from ..plugins import Backend

if TYPE_CHECKING:
    from .gate import ModelGate
    from .sides import OnThread

__all__ = ["MAX_SCALE", "AdapterCalls", "AdapterSet"]

#: LoRA scales beyond this are refused: useful ones are around 1, and the fingerprint folds
#: the scale in as a fixed-point number.
MAX_SCALE = 100.0


@attrs.define(eq=False)
class _Adapter:
    handle: int
    native: Any
    path: str
    sha256: bytes
    scale: float


class AdapterSet:
    def __init__(
        self,
        model_id: str,
        backend: Backend,
        base_fingerprint: bytes,
        on_change: Callable[[AdapterSet], None],
    ) -> None:
        self._model_id = model_id
        self._backend = backend
        self._base = base_fingerprint
        self._on_change = on_change
        self._adapters: dict[int, _Adapter] = {}
        self._ids = itertools.count(1)
        self.info: tuple[AdapterInfo, ...] = ()
        self.fingerprint = base_fingerprint

    def load(self, handle_arg: Any, path: str, sha256: bytes) -> int:
        native = self._backend.adapter_load(handle_arg, path)
        handle = next(self._ids)
        self._adapters[handle] = _Adapter(handle, native, path, sha256, 1.0)
        try:
            self._apply(handle_arg)
        except BaseException:
            del self._adapters[handle]
            self._backend.adapter_free(handle_arg, native)
            raise
        return handle

    def unload(self, handle_arg: Any, handle: int) -> None:
        ad = self._adapters.pop(handle, None)
        if ad is None:
            return  # idempotent
        self._apply(handle_arg)
        self._backend.adapter_free(handle_arg, ad.native)

    def set_scale(self, handle_arg: Any, handle: int, scale: float) -> None:
        ad = self._adapters.get(handle)
        if ad is None:
            raise InvalidRequest("handle", f"no adapter {handle} on model {self._model_id!r}")
        old, ad.scale = ad.scale, scale
        try:
            self._apply(handle_arg)
        except BaseException:
            # The backend refused it: the set, the fingerprint and the listing stay as they
            # were, so rows are never keyed by a scale the model does not run with.
            ad.scale = old
            self._apply(handle_arg)
            raise

    def clear(self) -> None:
        """The model was freed (which frees its adapters too)."""
        self._adapters.clear()
        self._changed()

    def _apply(self, handle_arg: Any) -> None:
        active = [(a.native, a.scale) for a in self._adapters.values()]
        self._backend.adapters_apply(handle_arg, active)
        self._changed()

    def _changed(self) -> None:
        ads = list(self._adapters.values())
        self.fingerprint = effective_fingerprint(self._base, [(a.sha256, a.scale) for a in ads])
        self.info = tuple(
            AdapterInfo(handle=a.handle, path=a.path, scale=a.scale, sha256=a.sha256.hex())
            for a in ads
        )
        self._on_change(self)


class AdapterCalls:
    """The loop's side of a model's adapters: each change is an exclusive call through the
    gate, queued FIFO with requests and run on the model thread while none is admitted."""

    def __init__(self, gate: ModelGate, backend: Backend) -> None:
        self._gate = gate
        self._backend = backend

    def list_adapters(self) -> tuple[AdapterInfo, ...]:
        return self._gate.view.adapters

    async def load_adapter(self, path: str) -> int:
        self._gate.check_serving()
        self._backend.require("adapters")
        if not isinstance(path, str) or not path:
            raise InvalidRequest("path", "must be a file path")
        try:
            sha = bytes.fromhex(await anyio.to_thread.run_sync(file_sha256, path))
        except OSError as exc:
            raise InvalidRequest("path", f"cannot read adapter {path!r}: {exc.strerror}") from exc

        def run(t: OnThread) -> int:
            return t.adapters.load(t.handle, path, sha)

        return await self._gate.call(run, exclusive=True)

    async def unload_adapter(self, handle: int) -> None:
        self._gate.check_serving()
        self._backend.require("adapters")

        def run(t: OnThread) -> None:
            t.adapters.unload(t.handle, handle)

        await self._gate.call(run, exclusive=True)

    async def set_adapter_scale(self, handle: int, scale: float) -> None:
        self._gate.check_serving()
        self._backend.require("adapters")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
            or abs(scale) > MAX_SCALE
        ):
            raise InvalidRequest(
                "scale", f"must be a number in [-{MAX_SCALE}, {MAX_SCALE}], got {scale!r}"
            )

        def run(t: OnThread) -> None:
            t.adapters.set_scale(t.handle, handle, float(scale))

        await self._gate.call(run, exclusive=True)
