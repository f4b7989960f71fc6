"""A model's LoRA adapter set and the fingerprint it folds into the cache key.

Changed only on the model thread, by exclusive calls that run while no request is admitted,
so a request is computed with the set (and keyed with the fingerprint) it was admitted
under. The loop reads :attr:`AdapterSet.info` and :attr:`AdapterSet.fingerprint`, which are
replaced whole, never mutated.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs

from ..cache.key import effective_fingerprint
from ..errors import InvalidRequest
from ..events import AdapterInfo
from ..plugins import Backend

__all__ = ["AdapterSet"]


@attrs.define(eq=False)
class _Adapter:
    handle: int
    native: Any
    path: str
    sha256: bytes
    scale: float


class AdapterSet:
    def __init__(self, model_id: str, backend: Backend, base_fingerprint: bytes) -> None:
        self._model_id = model_id
        self._backend = backend
        self._base = base_fingerprint
        self._adapters: dict[int, _Adapter] = {}
        self._ids = itertools.count(1)
        #: Snapshots for the loop (replaced after every change).
        self.info: tuple[AdapterInfo, ...] = ()
        self.fingerprint = base_fingerprint

    def rebase(self, base_fingerprint: bytes) -> None:
        self._base = base_fingerprint
        self._changed()

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
        ad.scale = scale
        self._apply(handle_arg)

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
