"""Memory pressure: pluggable sources and the scheduler that frees cache and idle models.

Sources are pluggy plugins implementing :class:`PressureSource` (entry-point group
``erllama.pressure``); the built-ins are ``psutil`` (host memory), ``nvidia_smi`` (per-GPU
memory) and ``custom`` (a callable in ``PressureConfig.custom``). Configure the scheduler
with ``EngineConfig(pressure=PressureConfig(...))`` and read it through
``engine.pressure_status()`` and ``engine.force_check()``. See docs/pressure.md.
"""

from .hookspecs import PressureSource as PressureSource
from .hookspecs import hookimpl as hookimpl
from .registry import PressureSourceRegistry as PressureSourceRegistry
from .registry import SourcePlugin as SourcePlugin
from .registry import make_pressure_registry as make_pressure_registry
from .types import DeviceMemory as DeviceMemory
from .types import PressureOutcome as PressureOutcome
from .types import PressureResult as PressureResult
from .types import PressureSample as PressureSample
from .types import PressureStatus as PressureStatus
from .types import TierEviction as TierEviction

__all__ = [
    "DeviceMemory",
    "PressureOutcome",
    "PressureResult",
    "PressureSample",
    "PressureSource",
    "PressureSourceRegistry",
    "PressureStatus",
    "SourcePlugin",
    "TierEviction",
    "hookimpl",
    "make_pressure_registry",
]
