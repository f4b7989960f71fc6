"""``source="nvidia_smi"``: memory used and total on every NVIDIA GPU, from ``nvidia-smi``.

Each sample runs::

    nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader,nounits

as a subprocess (off the event loop, killed if it outlives ``PressureConfig.sample_timeout_s``)
and reads one ``index, used MiB, total MiB`` line per GPU, as devices ``gpu0``, ``gpu1`` ...
Pressure follows the fullest GPU: summing them would hide one full GPU behind an empty one.

A missing ``nvidia-smi``, a non-zero exit (no driver, no GPU) or output that does not parse
(``[N/A]``, an unexpected format) gives an unavailable sample naming the cause, never a crash
and never a guessed reading.

Cache rows live in host memory: evicting them frees nothing on a GPU. With this source, set
``evict_tiers = []`` so a round goes straight to unloading idle models.
"""

from __future__ import annotations

import shutil
import subprocess

import anyio

from ..config import PressureConfig
from .hookspecs import hookimpl
from .types import DeviceMemory, PressureSample

__all__ = ["QUERY", "parse_output", "sample"]

MIB = 1024 * 1024
QUERY = (
    "--query-gpu=index,memory.used,memory.total",
    "--format=csv,noheader,nounits",
)


def _mib(field: str, what: str, line: str) -> int:
    try:
        value = int(field)
    except ValueError:
        raise ValueError(f"cannot read {what} from {line.strip()!r}") from None
    if value < 0:
        raise ValueError(f"negative {what} in {line.strip()!r}")
    return value * MIB


def parse_output(text: str) -> tuple[DeviceMemory, ...]:
    """Parse the query's CSV (one ``index, used, total`` line per GPU, MiB).

    Raises ValueError naming the first line that is not a plausible reading: every GPU must
    parse, or the fullest one might be the one that did not.
    """
    devices: list[DeviceMemory] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise ValueError(f"expected 'index, memory.used, memory.total', got {line.strip()!r}")
        index, used, total = fields
        if not index.isdigit():
            raise ValueError(f"cannot read the GPU index from {line.strip()!r}")
        used_b = _mib(used, "memory.used", line)
        total_b = _mib(total, "memory.total", line)
        if total_b == 0 or used_b > total_b:
            raise ValueError(f"implausible memory reading {line.strip()!r}")
        devices.append(DeviceMemory(name=f"gpu{index}", used_bytes=used_b, total_bytes=total_b))
    if not devices:
        raise ValueError("nvidia-smi listed no GPUs")
    return tuple(devices)


def _first_line(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text.splitlines()[0] if text else ""


@hookimpl
async def sample(config: PressureConfig) -> PressureSample | tuple[DeviceMemory, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return PressureSample.unavailable("nvidia-smi not found on PATH")
    try:
        proc = await anyio.run_process([exe, *QUERY], check=False, stdin=subprocess.DEVNULL)
    except OSError as exc:
        return PressureSample.unavailable(f"cannot run {exe}: {exc.strerror or exc}")
    if proc.returncode != 0:
        why = _first_line(proc.stdout) or _first_line(proc.stderr) or "no output"
        return PressureSample.unavailable(f"nvidia-smi exited with status {proc.returncode}: {why}")
    try:
        return parse_output(proc.stdout.decode("utf-8", errors="replace"))
    except ValueError as exc:
        return PressureSample.unavailable(f"unparsable nvidia-smi output: {exc}")


async def gpu_memory(timeout_s: float = 10.0) -> list[DeviceMemory]:
    """Memory of each visible GPU, for ``Engine.vram_info``: empty when nvidia-smi is
    missing, fails, hangs past ``timeout_s`` or prints nothing usable (never a guess)."""
    with anyio.move_on_after(timeout_s):
        found = await sample(PressureConfig(source="nvidia_smi"))
        if isinstance(found, tuple):
            return list(found)
    return []
