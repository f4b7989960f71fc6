"""The ``PressureSource`` hook specification: how the pressure scheduler reads memory use.

A pressure source is a pluggy plugin (a module, an object, or a class taking no arguments)
implementing :meth:`PressureSource.sample`, registered in the entry-point group
``erllama.pressure`` under the name users give as ``PressureConfig.source``::

    [project.entry-points."erllama.pressure"]
    mysource = "my_package.pressure"

The built-in ``psutil``, ``nvidia_smi`` and ``custom`` sources register the same way. Each
source gets its own plugin manager (project name ``erllama.pressure``, distinct from the
backends' ``erllama``), so a module may be a backend and a pressure source at once.
"""

from __future__ import annotations

from typing import Any

import pluggy

from ..config import PressureConfig

__all__ = ["PROJECT", "PressureSource", "hookimpl", "hookspec"]

PROJECT = "erllama.pressure"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PressureSource:
    """Hook specifications for a pressure source."""

    @hookspec(firstresult=True)
    def sample(self, config: PressureConfig) -> Any:
        """Read memory use now. Called once per scheduler round (every
        ``config.interval_s`` seconds while enabled, and on ``engine.force_check()``), on the
        event loop, under a timeout of ``config.sample_timeout_s``.

        May be a plain function or ``async def``. Must not block the event loop: run blocking
        work with ``anyio.to_thread.run_sync`` or ``anyio.run_process``, and use anyio only
        (the engine may run on asyncio or trio).

        Return one of:

        * ``(used_bytes, total_bytes)`` for a single device;
        * a sequence of such pairs, or of :class:`~erllama.pressure.DeviceMemory`, one per
          device (pressure follows the fullest);
        * a :class:`~erllama.pressure.PressureSample`, including
          ``PressureSample.unavailable("why")`` when the source cannot read.

        Raising is allowed and is treated like ``unavailable`` (logged, never fatal), but
        prefer returning ``unavailable`` with a clear reason. Never invent a reading: an
        unavailable sample makes the round skip, a made-up one makes it evict.
        """
        raise NotImplementedError
