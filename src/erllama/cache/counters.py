"""Cache counters: cheap mutable tallies, read as frozen snapshots."""

from __future__ import annotations

import attrs

__all__ = ["CacheCounters", "Counters"]


@attrs.frozen(kw_only=True)
class CacheCounters:
    """A snapshot of ``engine.cache_counters()``. Counts are since the engine opened; bytes
    and rows are current. Times are totals in seconds."""

    hits_exact: int = 0
    hits_resume: int = 0
    hits_longest_prefix: int = 0
    misses: int = 0
    #: Admissions served by a sequence's own live KV (the previous request's cells, kept):
    #: no cache row was read. Not counted in ``hits``.
    hits_live: int = 0
    saves_cold: int = 0
    saves_continued: int = 0
    saves_finish: int = 0
    saves_evict: int = 0
    saves_shutdown: int = 0
    #: Saves refused because the writers were busy or no tier had room (never waited for),
    #: or lost because their write failed.
    saves_dropped: int = 0
    #: Writes to a file tier that failed with an error (a full disk, EIO, EACCES ...), saves
    #: and spills alike. A failed save is also in ``saves_dropped``; a failed spill leaves its
    #: row where it was. The first failure is logged with its cause, later ones in a
    #: rate-limited summary.
    save_errors: int = 0
    #: Saves of a row that already existed (not written again; the key is still valid).
    duplicate_saves: int = 0
    #: Rows deleted to make room (budgets, pressure, gc).
    evictions: int = 0
    #: Rows moved down a tier (RAM -> ram_file -> disk) instead of being dropped.
    spills: int = 0
    #: Damaged rows found (checksum, size, key, or a backend refusing the state); each was a
    #: miss and has been removed.
    corrupt_files: int = 0
    #: Rows adopted from files published by another process or an interrupted writer.
    adopted: int = 0
    bytes_ram: int = 0
    bytes_ram_file: int = 0
    bytes_disk: int = 0
    rows_ram: int = 0
    rows_ram_file: int = 0
    rows_disk: int = 0
    #: Time packing states on model threads, reading rows, and searching the index.
    pack_s: float = 0.0
    load_s: float = 0.0
    lookup_s: float = 0.0
    lookups: int = 0

    @property
    def hits(self) -> int:
        return self.hits_exact + self.hits_resume + self.hits_longest_prefix

    @property
    def saves(self) -> int:
        return (
            self.saves_cold
            + self.saves_continued
            + self.saves_finish
            + self.saves_evict
            + self.saves_shutdown
        )


@attrs.define
class Counters:
    """The live tallies behind :class:`CacheCounters` (touched only on the event loop)."""

    values: dict[str, float] = attrs.Factory(
        lambda: {f.name: f.default for f in attrs.fields(CacheCounters)}  # type: ignore[misc]
    )

    def bump(self, name: str, by: float = 1) -> None:
        self.values[name] += by

    def reset(self) -> None:
        """Every tally back to zero (byte and row totals are current values, not tallies)."""
        self.values = {f.name: f.default for f in attrs.fields(CacheCounters)}  # type: ignore[misc]

    def snapshot(self, **current: int) -> CacheCounters:
        return CacheCounters(**{**self.values, **current})  # type: ignore[arg-type]
