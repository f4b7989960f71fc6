"""Saves to a tier whose writes fail: generation never notices, every failure is counted in
``save_errors`` (and ``saves_dropped``), and the log holds the first failure with its cause
and one summary of the rest, not a traceback per save."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama.cache.tiers import FileTier
from erllama.plugins import BackendRegistry

from ..helpers import SmallDisk, cold_run, stub_config, words

pytestmark = pytest.mark.anyio

#: One save (the finish row) per request.
POLICY = erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000, continued_interval=10_000)
N_REQUESTS = 8
ENOSPC_CAUSE = "OSError: [Errno 28] No space left on device"


def disk_only(disk: Path) -> erllama.EngineConfig:
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(
            ram_bytes=0, ram_file_dir=None, disk_dir=disk, policy=POLICY, sweep_interval_s=3600
        )
    )


def cache_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "erllama.cache" and r.levelno >= logging.WARNING]


async def run_requests(engine: erllama.Engine, registry: BackendRegistry) -> None:
    """Requests that each try one save, waiting for each write: every save is attempted."""
    mid = await engine.load_model("m", stub_config())
    for i in range(N_REQUESTS):
        r = await engine.complete(mid, words(20, 50 * i), max_tokens=3)
        await engine.wait_saved()
        cold = await cold_run(registry, words(20, 50 * i), max_tokens=3)
        assert (r.text, r.token_ids) == (cold.text, cold.token_ids)


def assert_logged_once_then_summarised(records: list[logging.LogRecord]) -> None:
    first, summary = records
    assert ENOSPC_CAUSE in first.getMessage() and first.exc_info is not None
    assert (
        summary.getMessage() == f"{N_REQUESTS - 1} more cache writes failed (last: {ENOSPC_CAUSE})"
    )


async def test_failing_writes_are_counted_and_logged_once_then_summarised(
    registry: BackendRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_space(self: FileTier, *a: Any) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileTier, "write_tmp", no_space)
    async with erllama.open_engine(disk_only(tmp_path / "disk"), backends=registry) as engine:
        await run_requests(engine, registry)
        c = engine.cache_counters()
        assert c.save_errors == N_REQUESTS and c.saves_dropped == N_REQUESTS
        assert c.saves == 0 and c.rows_disk == 0
        assert len(cache_errors(caplog)) == 1  # the rest wait for the summary
    assert_logged_once_then_summarised(cache_errors(caplog))


async def test_a_full_filesystem_is_survived_the_same_way(
    registry: BackendRegistry, small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    small_disk.fill()
    async with erllama.open_engine(disk_only(small_disk.path), backends=registry) as engine:
        await run_requests(engine, registry)
        c = engine.cache_counters()
        assert c.save_errors == c.saves_dropped == N_REQUESTS
    assert_logged_once_then_summarised(cache_errors(caplog))
    # No temp left behind: no file at all (the replies' records could not be written
    # either, and left only their empty folder).
    assert [p for p in small_disk.path.rglob("*") if not p.is_dir()] == []
