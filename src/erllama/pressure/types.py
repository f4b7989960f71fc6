"""What the pressure scheduler measures and reports: frozen snapshots, never live objects.

A *sample* is one reading of a pressure source: used and total bytes for each device it
watches (``system`` for host memory, ``gpu0``, ``gpu1`` ... for GPUs). Pressure is driven by
the fullest device, so one full GPU is never hidden behind an empty one. A source that cannot
read gives an *unavailable* sample (``error`` says why): a typed state, never an exception and
never a made-up reading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import attrs

__all__ = [
    "DeviceMemory",
    "PressureOutcome",
    "PressureResult",
    "PressureSample",
    "PressureStatus",
    "TierEviction",
    "coerce_sample",
]

#: What one round did: ``freed`` (rows evicted and/or models unloaded) or why it skipped.
PressureOutcome = Literal[
    "freed", "disabled", "below_watermark", "nothing_to_evict", "unavailable", "failed"
]


@attrs.frozen(kw_only=True)
class DeviceMemory:
    """Memory of one device at one moment."""

    #: ``system`` for host memory, ``gpu<index>`` for a GPU, or a custom source's label.
    name: str
    used_bytes: int
    total_bytes: int

    @property
    def ratio(self) -> float:
        return self.used_bytes / self.total_bytes

    def excess_over(self, watermark: float) -> int:
        """Bytes to free before this device is at ``watermark`` (0 when already there)."""
        return max(0, math.ceil(self.used_bytes - watermark * self.total_bytes))


@attrs.frozen(kw_only=True)
class PressureSample:
    """One reading of a pressure source: every device it watches, or why it could not read."""

    #: Registered name of the source that took it.
    source: str = ""
    devices: tuple[DeviceMemory, ...] = ()
    #: ``anyio.current_time()`` when taken (monotonic seconds, like ``ModelInfo.loaded_at``).
    taken_at: float = 0.0
    #: Set when the source could not read: a missing tool, a failure, unparsable output.
    error: str | None = None

    @classmethod
    def unavailable(cls, reason: str, *, source: str = "") -> PressureSample:
        """A reading that did not happen, and why (what a source returns instead of raising)."""
        return cls(source=source, error=reason)

    @property
    def available(self) -> bool:
        return self.error is None and bool(self.devices)

    @property
    def fullest(self) -> DeviceMemory | None:
        """The device with the highest used/total ratio, which drives pressure."""
        if not self.available:
            return None
        return max(self.devices, key=lambda d: d.ratio)

    @property
    def ratio(self) -> float | None:
        d = self.fullest
        return None if d is None else d.ratio

    @property
    def used_bytes(self) -> int | None:
        d = self.fullest
        return None if d is None else d.used_bytes

    @property
    def total_bytes(self) -> int | None:
        d = self.fullest
        return None if d is None else d.total_bytes

    def excess_over(self, watermark: float) -> int:
        """Bytes to free before every device is at ``watermark``."""
        return max((d.excess_over(watermark) for d in self.devices), default=0)


@attrs.frozen(kw_only=True)
class TierEviction:
    """Cache rows one round evicted from one tier."""

    tier: str
    rows: int
    bytes: int


@attrs.frozen(kw_only=True)
class PressureResult:
    """What one round (periodic or ``force_check``) did, or why it skipped."""

    outcome: PressureOutcome
    #: The reading that decided the round (None when disabled).
    sample: PressureSample | None = None
    #: The last reading of the round, after freeing (the same as ``sample`` if none was taken).
    after: PressureSample | None = None
    #: Bytes the round set out to free: excess over the low watermark, at least
    #: ``min_evict_bytes`` (0 when it skipped).
    target_bytes: int = 0
    #: Cache rows evicted, per tier, in the order the tiers were tried.
    evicted: tuple[TierEviction, ...] = ()
    #: Models unloaded, in order (least recently used first).
    unloaded_models: tuple[str, ...] = ()
    started_at: float = 0.0
    finished_at: float = 0.0
    #: For ``failed`` and ``unavailable``: what went wrong.
    error: str | None = None

    @property
    def skipped(self) -> bool:
        return self.outcome != "freed"

    @property
    def evicted_rows(self) -> int:
        return sum(t.rows for t in self.evicted)

    @property
    def evicted_bytes(self) -> int:
        return sum(t.bytes for t in self.evicted)


@attrs.frozen(kw_only=True)
class PressureStatus:
    """A snapshot of ``engine.pressure_status()``: settings, the last reading and round,
    and counters since the engine opened."""

    enabled: bool
    #: True while the periodic task runs (enabled and the engine open).
    running: bool
    source: str
    interval_s: float
    high_watermark: float
    low_watermark: float
    min_evict_bytes: int
    evict_tiers: tuple[str, ...]
    unload_idle_models: bool
    #: The most recent reading (of any round, periodic or forced), possibly unavailable.
    last_sample: PressureSample | None = None
    last_result: PressureResult | None = None
    #: The most recent round that freed anything: what, and when (``finished_at``).
    last_freed: PressureResult | None = None
    #: Rounds run (every one that took a sample; ``disabled`` checks are not rounds).
    rounds: int = 0
    evicted_rows: int = 0
    evicted_bytes: int = 0
    unloaded_models: int = 0
    unavailable_samples: int = 0
    failed_rounds: int = 0
    #: The most recent problem (an unavailable reading or a failed round); later good rounds
    #: do not clear it: compare with ``last_result`` to see whether it is current.
    last_error: str | None = None

    @property
    def last_ratio(self) -> float | None:
        return None if self.last_sample is None else self.last_sample.ratio


def _byte_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of bytes, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return int(value)


def _device(name: str, used: Any, total: Any) -> DeviceMemory:
    u = _byte_count(used, f"{name}: used")
    t = _byte_count(total, f"{name}: total")
    if t <= 0:
        raise ValueError(f"{name}: total must be > 0, got {total!r}")
    if u > t:
        raise ValueError(f"{name}: used ({u}) exceeds total ({t})")
    return DeviceMemory(name=name, used_bytes=u, total_bytes=t)


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str | bytes)
        and len(value) == 2
        and all(isinstance(v, int | float) for v in value)
    )


def coerce_sample(raw: Any, source: str) -> PressureSample:
    """Turn what a source hook returned into a checked :class:`PressureSample`.

    Accepted: a PressureSample, a DeviceMemory, a ``(used_bytes, total_bytes)`` pair, or a
    sequence of DeviceMemory / pairs (one per device). Raises ValueError for anything else,
    and for readings that cannot be true (negative, total 0, used above total).
    """
    if raw is None:
        raise ValueError("the source returned nothing")
    if isinstance(raw, PressureSample):
        if raw.error is None:
            for d in raw.devices:
                _device(d.name, d.used_bytes, d.total_bytes)
            if not raw.devices:
                raise ValueError("the sample lists no devices")
        return attrs.evolve(raw, source=source)
    if isinstance(raw, DeviceMemory):
        raw = [raw]
    if _is_pair(raw):
        return PressureSample(source=source, devices=(_device(source, raw[0], raw[1]),))
    if isinstance(raw, Sequence) and not isinstance(raw, str | bytes) and raw:
        devices = []
        for i, item in enumerate(raw):
            if isinstance(item, DeviceMemory):
                devices.append(_device(item.name, item.used_bytes, item.total_bytes))
            elif _is_pair(item):
                devices.append(_device(f"{source}{i}", item[0], item[1]))
            else:
                raise ValueError(f"device {i}: expected (used_bytes, total_bytes), got {item!r}")
        return PressureSample(source=source, devices=tuple(devices))
    raise ValueError(f"expected (used_bytes, total_bytes), got {raw!r}")
