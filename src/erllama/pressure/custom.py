"""``source="custom"``: a callable given as ``PressureConfig.custom``.

The callable takes no arguments and returns ``(used_bytes, total_bytes)`` (or anything the
:meth:`~erllama.pressure.PressureSource.sample` hook may return). It may be ``async def``;
a plain function is called on the event loop, so it must be quick and must not block (do
blocking reads in an async callable through ``anyio.to_thread.run_sync``). In TOML, give it
as ``"package.module:function"``.

If it raises, the reading is unavailable (logged), never a crash.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..config import PressureConfig
from .hookspecs import hookimpl
from .types import PressureSample

__all__ = ["sample"]


@hookimpl
async def sample(config: PressureConfig) -> Any:
    fn = config.custom
    if fn is None:
        return PressureSample.unavailable(
            "source 'custom' has no callable in PressureConfig.custom"
        )
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
