"""``source="psutil"``: host (system) memory, as the kernel reports it.

Used is ``total - available``: memory the kernel cannot hand out without swapping. Page
cache and reclaimable buffers count as available, so a large mmapped GGUF file does not by
itself look like pressure. The reading is one device named ``system``.

This is the whole machine's memory, not a container's cgroup limit.
"""

from __future__ import annotations

import anyio
import psutil

from ..config import PressureConfig
from .hookspecs import hookimpl
from .types import DeviceMemory, PressureSample

__all__ = ["read_system_memory", "sample"]


def read_system_memory() -> DeviceMemory:
    vm = psutil.virtual_memory()
    total = int(vm.total)
    # ``available`` is the kernel's own estimate (MemAvailable); never below 0 or above total.
    used = min(total, max(0, total - int(vm.available)))
    return DeviceMemory(name="system", used_bytes=used, total_bytes=total)


@hookimpl
async def sample(config: PressureConfig) -> PressureSample | DeviceMemory:
    # A /proc read is cheap, but it is still a syscall: keep it off the event loop.
    return await anyio.to_thread.run_sync(read_system_memory, abandon_on_cancel=True)
