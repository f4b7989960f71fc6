"""A child engine saving rows continuously, killed with SIGKILL at random moments.

After each kill a fresh engine in this process opens the same directory and sweeps it: no
temp survives the sweep, no row is damaged, and every row that loads gives the same greedy
output as a cold run with the cache off. tests/cache/test_crash.py kills a bare FileTier
writer at random points and checks the files; this kills a whole engine (its writer pool
mid-publish, its hit-count updates, requests in flight) and checks what an engine serves
from what is left.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import anyio
import attrs
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

import erllama
from erllama.plugins import BackendRegistry

from . import saver_child
from .conftest import record

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

FILE = "kill mid-save"
KILLS = 10
#: How long a child saves before it is killed: up to a few hundred requests' worth of rows.
SAVING_S = (0.02, 0.4)
#: Rows checked against a cold run after each kill (those not checked after an earlier one).
CHECKS_PER_KILL = 12
TTL_S = 0.05
MAX_TOKENS = 4
CHILD = Path(saver_child.__file__)


@attrs.define(eq=False)
class Child:
    proc: Process
    out: BufferedByteReceiveStream

    async def expect(self, line: bytes, errors: Path) -> None:
        with anyio.fail_after(30):
            got = await self.out.receive_until(b"\n", 100)
        assert got == line, f"child said {got!r}; its stderr:\n{errors.read_text()}"


@pytest.fixture
def errors(tmp_path: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """Where the children's stderr goes: one file, read back in failure messages."""
    path = tmp_path / "child-stderr"
    with open(path, "ab") as f:
        yield path, f


@asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """Spawned children, each killed (if still alive) on the way out."""
    spawned: list[Child] = []
    try:
        yield spawned
    finally:
        for child in spawned:
            if child.proc.returncode is None:
                child.proc.kill()
            with anyio.CancelScope(shield=True):
                await child.proc.aclose()


async def spawn(
    spawned: list[Child], disk: Path, backend: str, seed: int, stderr: BinaryIO
) -> Child:
    proc = await anyio.open_process(
        [sys.executable, str(CHILD), str(disk), backend, str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    assert proc.stdout is not None
    child = Child(proc, BufferedByteReceiveStream(proc.stdout))
    spawned.append(child)
    return child


async def test_rows_left_by_an_engine_killed_mid_save_are_valid_or_gone(
    registry: BackendRegistry,
    anyio_backend: str,
    tmp_path: Path,
    errors: tuple[Path, BinaryIO],
) -> None:
    disk, (errors_path, stderr) = tmp_path / "disk", errors
    rng = random.Random(5678)
    checked: set[str] = set()
    last_count = 0
    no_cache = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    # The parent only reads: no saves of its own, so what it finds is the child's work.
    reader = saver_child.config(
        disk,
        reservation_ttl_s=TTL_S,
        sweep_interval_s=3600.0,
        policy=attrs.evolve(
            saver_child.POLICY, save_finish=False, cold_min_tokens=10_000, continued_interval=10_000
        ),
    )
    async with (
        erllama.open_engine(no_cache, backends=registry) as cold,
        children() as spawned,
    ):
        cold_mid = await cold.load_model("m", saver_child.model())
        upcoming = await spawn(spawned, disk, anyio_backend, 0, stderr)
        for kill in range(KILLS):
            child = upcoming
            await child.expect(b"ready", errors_path)
            assert child.proc.stdin is not None
            await child.proc.stdin.send(b"go\n")
            await child.expect(b"saving", errors_path)
            await anyio.sleep(rng.uniform(*SAVING_S))  # a random point to kill at (jitter)
            # Start the next child now: its interpreter start-up overlaps the checks below.
            if kill + 1 < KILLS:
                upcoming = await spawn(spawned, disk, anyio_backend, kill + 1, stderr)
            child.proc.send_signal(signal.SIGKILL)
            assert await child.proc.wait() == -signal.SIGKILL, errors_path.read_text()
            temps = len(list(disk.glob("*.tmp")))
            record(f"{FILE}: kills")
            record(f"{FILE}: kills that left a temp", temps > 0)
            record(f"{FILE}: temps left by kills", temps)

            with anyio.fail_after(10):
                async with erllama.open_engine(reader, backends=registry) as engine:
                    # A wall-clock wait on purpose: every temp is now older than the TTL.
                    await anyio.sleep(TTL_S)
                    await engine.sweep_cache()
                    assert list(disk.glob("*.tmp")) == []
                    mid = await engine.load_model("m", saver_child.model())
                    # Publishing is link-after-fsync: a kill never leaves a damaged row.
                    assert engine.cache_counters().corrupt_files == 0
                    rows = {r.key: r for r in engine.cache_rows() if r.key not in checked}
                    for key in rng.sample(sorted(rows), min(CHECKS_PER_KILL, len(rows))):
                        tokens = list(rows[key].tokens)
                        warm = await engine.complete(mid, tokens, max_tokens=MAX_TOKENS)
                        ref = await cold.complete(cold_mid, tokens, max_tokens=MAX_TOKENS)
                        assert warm.cache_hit_kind == "exact", f"row {key} did not load"
                        assert (warm.text, warm.token_ids) == (ref.text, ref.token_ids)
                        checked.add(key)
                    record(
                        f"{FILE}: rows checked against a cold run", min(CHECKS_PER_KILL, len(rows))
                    )
                    last_count = len(engine.cache_rows())
                    assert engine.cache_counters().corrupt_files == 0
    record(f"{FILE}: rows on disk after the last kill", last_count)
    assert "Traceback" not in errors_path.read_text()
