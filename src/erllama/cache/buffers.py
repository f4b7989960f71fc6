"""Reusable read buffers for file-tier rows.

A fresh multi-MB ``bytearray`` is zeroed and page-faulted in on first touch: the benchmark
measured about 30 ms for a 46 MB row on a 2-core VM, several times the cost of restoring it.
Rows are read into buffers kept from earlier reads instead; a buffer goes back to the pool
once the backend has unpacked the state from it.
"""

from __future__ import annotations

import threading

__all__ = ["BufferPool"]

_ROUND = 1 << 20  # capacities are rounded up to 1 MiB so similar rows share buffers


class BufferPool:
    """Free buffers, reused for reads of up to their capacity. Thread-safe (readers run on
    worker threads). A buffer never given back is simply garbage collected."""

    def __init__(self, keep: int = 2, max_bytes: int = 512 << 20) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def take(self, n: int) -> memoryview:
        """A writable view of exactly ``n`` bytes (contents undefined until written)."""
        with self._lock:
            fits = [b for b in self._free if len(b) >= n]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                return memoryview(buf)[:n]
        return memoryview(bytearray(-(-n // _ROUND) * _ROUND if n else 0))[:n]

    def give(self, view: memoryview | bytes | bytearray) -> None:
        """Return a view from :meth:`take` (other objects are ignored)."""
        if not isinstance(view, memoryview) or not isinstance(view.obj, bytearray):
            return
        buf = view.obj
        try:
            view.release()
            # A bytearray cannot change size while any view of it is alive: this fails if a
            # reader kept a slice, and such a buffer must never be handed out again.
            buf.append(0)
            buf.pop()
        except BufferError:
            return  # still exported somewhere: let it go to the garbage collector
        if len(buf) > self._max_bytes:
            return
        with self._lock:
            if any(b is buf for b in self._free):
                return
            self._free.append(buf)
            # Keep the largest few: they serve every smaller read too.
            self._free.sort(key=len, reverse=True)
            del self._free[self._keep :]
