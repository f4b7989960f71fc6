"""Hostile cache directories: junk, truncated and bit-flipped rows, special files named like
rows, unreadable entries, a directory changed under a running engine, more rows than the
budget, a disk that fills up. In every case the engine opens promptly, serves every request
exactly as a cold run with the cache off does, counts the damaged files, and never serves a
damaged row: a query for a damaged row is a cold run, and the backend is never handed a state
it has to refuse.

Valid rows come from a first engine run (one finish row per prompt, on the disk tier only),
and are then damaged on disk, before the engine under test opens or while it runs.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

import erllama
from erllama.cache.format import HEADER_SIZE, HIT_COUNT_OFFSET, RowMeta
from erllama.cache.tiers import FileTier
from erllama.plugins import BackendRegistry

from ..helpers import SmallDisk, stub_config, words
from .conftest import record

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FILE = "hostile cache"
#: One finish row per request; no cold or continued rows, so row counts are exact.
POLICY = erllama.CachePolicy(min_tokens=4, cold_min_tokens=10_000, continued_interval=10_000)
N_ROWS = 8
MAX_TOKENS = 4
#: "Promptly": far below the 30 s writer drain an engine waits for at worst.
OPEN_S = 5.0

Kind = Literal["exact", "partial", "cold"]
Query = tuple[tuple[int, ...], Kind]


def disk_cfg(disk: Path, **kw: Any) -> erllama.EngineConfig:
    fields: dict[str, Any] = {
        "ram_bytes": 0,
        "ram_file_dir": None,
        "disk_dir": disk,
        "policy": POLICY,
        "sweep_interval_s": 3600.0,
    }
    fields.update(kw)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))


def row_path(disk: Path, key: bytes) -> Path:
    return disk / f"{key.hex()}.kvc"


def random_key(rng: random.Random) -> bytes:
    return rng.randbytes(32)


async def make_rows(registry: BackendRegistry, disk: Path, n: int = N_ROWS) -> list[RowMeta]:
    """Run a first engine that leaves ``n`` valid rows in ``disk``; oldest first."""
    async with erllama.open_engine(disk_cfg(disk), backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        for i in range(n):
            await engine.complete(mid, words(24, 100 * i), max_tokens=3)
            await engine.wait_saved()
    with FileTier("disk", disk) as tier:
        metas, corrupt = tier.scan(3600)
    assert corrupt == 0 and len(metas) == n
    return sorted(metas, key=lambda m: m.created_ns)


class Harness:
    """Cold references, and an engine under test that must serve exactly like them."""

    def __init__(self, registry: BackendRegistry, caplog: pytest.LogCaptureFixture) -> None:
        self.registry = registry
        self.caplog = caplog
        self.cold: dict[tuple[int, ...], tuple[str, tuple[int, ...]]] = {}

    async def references(self, prompts: Sequence[tuple[int, ...]]) -> None:
        """What a cache-off engine answers to each prompt (one engine for all of them)."""
        missing = [p for p in prompts if p not in self.cold]
        cfg = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
        async with erllama.open_engine(cfg, backends=self.registry) as engine:
            mid = await engine.load_model("m", stub_config())
            for p in missing:
                r = await engine.complete(mid, list(p), max_tokens=MAX_TOKENS)
                self.cold[p] = (r.text, tuple(r.token_ids))

    @asynccontextmanager
    async def opened(self, cfg: erllama.EngineConfig) -> AsyncIterator[erllama.Engine]:
        t0 = time.monotonic()
        async with erllama.open_engine(cfg, backends=self.registry) as engine:
            assert time.monotonic() - t0 < OPEN_S, "the engine did not open promptly"
            await engine.load_model("m", stub_config(keep_live_kv=False))
            yield engine
            record(f"{FILE}: corrupt files counted", engine.cache_counters().corrupt_files)
        # The cache caught every damaged row itself: none reached the backend (whose refusal
        # KVCache.reject would log as "backend refused cache row ..."), and no lookup raised
        # (the model would log "cache lookup failed" and serve cold).
        for what in ("backend refused", "cache lookup failed"):
            assert [r for r in self.caplog.records if what in r.getMessage()] == []

    async def serve(self, engine: erllama.Engine, queries: Sequence[Query]) -> None:
        await self.references([p for p, _ in queries])
        for prompt, kind in queries:
            r = await engine.complete("m", list(prompt), max_tokens=MAX_TOKENS)
            assert (r.text, tuple(r.token_ids)) == self.cold[prompt]
            assert r.cache_hit_kind == kind, f"{kind} expected for a {len(prompt)}-token row"
        record(f"{FILE}: requests", len(queries))


@pytest.fixture
def harness(registry: BackendRegistry, caplog: pytest.LogCaptureFixture) -> Harness:
    caplog.set_level(logging.WARNING, logger="erllama")
    return Harness(registry, caplog)


def queries(metas: Sequence[RowMeta], missed: set[bytes]) -> list[Query]:
    """One query per row, for exactly its tokens: a hit from an intact row, a cold run for a
    damaged (or unreadable) one; the rows share no prefix that could stand in for another."""
    return [(m.tokens, "cold" if m.key in missed else "exact") for m in metas]


def planted(n: int) -> None:
    record(f"{FILE}: hostile entries planted", n)


def counted(engine: erllama.Engine, expected: int) -> None:
    assert engine.cache_counters().corrupt_files == expected


async def test_junk_files_are_counted_and_removed(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    disk, rng = tmp_path / "disk", random.Random(1)
    metas = await make_rows(registry, disk)
    junk = {
        "empty": b"",
        "one byte": b"\0",
        "random, shorter than a header": rng.randbytes(HEADER_SIZE - 1),
        "random 4 KiB": rng.randbytes(4096),
        "magic and noise": b"ERKV" + rng.randbytes(HEADER_SIZE + 100),
    }
    for data in junk.values():
        row_path(disk, random_key(rng)).write_bytes(data)
    # Names that are not a row's: never parsed, removed as corrupt.
    valid = row_path(disk, metas[0].key).read_bytes()
    for name in ("junk.kvc", "A" * 64 + ".kvc", "ab" * 31 + ".kvc"):
        (disk / name).write_bytes(valid)
    # A valid row under another row's name: the key recomputed from it does not match.
    row_path(disk, random_key(rng)).write_bytes(valid)
    # Not ours: left alone. A stale temp: removed quietly (a writer died long ago).
    (disk / "README").write_text("an operator's note")
    stale = disk / f"{random_key(rng).hex()}.kvc.1.abcdef.tmp"
    stale.write_bytes(b"half a row")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    planted(len(junk) + 3 + 1 + 2)

    async with harness.opened(disk_cfg(disk)) as engine:
        counted(engine, len(junk) + 3 + 1)
        await harness.serve(engine, queries(metas, missed=set()))
    left = {p.name for p in disk.iterdir()}
    assert "README" in left and stale.name not in left
    assert {n for n in left if n.endswith(".kvc")} >= {f"{m.key.hex()}.kvc" for m in metas}


def cut_points(meta: RowMeta) -> list[int]:
    """Truncation points in each part of a row: header, metadata, payload, last byte."""
    return [0, HEADER_SIZE // 2, HEADER_SIZE + 8, meta.file_size - 1]


async def test_truncated_rows_are_caught_before_and_after_the_engine_indexed_them(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    metas = await make_rows(registry, disk)
    before, after = metas[:4], metas[4:6]
    for meta, cut in zip(before, cut_points(metas[0]), strict=True):
        os.truncate(row_path(disk, meta.key), cut)
    planted(len(before) + len(after))
    damaged = {m.key for m in before + after}
    async with harness.opened(disk_cfg(disk)) as engine:
        counted(engine, len(before))  # the start-up scan checks lengths against file sizes
        for meta, cut in zip(after, cut_points(metas[0])[2:], strict=True):
            os.truncate(row_path(disk, meta.key), cut)  # indexed, then cut under the engine
        await harness.serve(engine, queries(metas, damaged))
        counted(engine, len(damaged))
    assert not any(row_path(disk, k).exists() for k in damaged)


def flip_positions(meta: RowMeta, rng: random.Random) -> list[int]:
    """One byte in each checked part: header (not the unchecked hit count), header checksum,
    metadata, payload."""
    header = [*range(HIT_COUNT_OFFSET), *range(HIT_COUNT_OFFSET + 4, HEADER_SIZE - 8)]
    meta_end = meta.file_size - (meta.n_tokens * 4 + 20)  # the stub's payload: 20 + 4 n bytes
    return [
        rng.choice(header),
        rng.randrange(HEADER_SIZE - 8, HEADER_SIZE),
        rng.randrange(HEADER_SIZE, meta_end),
        rng.randrange(meta_end, meta.file_size),
    ]


def flip(path: Path, offset: int, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))


async def test_bit_flipped_rows_are_never_served(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    disk, rng = tmp_path / "disk", random.Random(2)
    metas = await make_rows(registry, disk)
    before, after = metas[:4], metas[4:8]
    for meta, at in zip(before, flip_positions(metas[0], rng), strict=True):
        flip(row_path(disk, meta.key), at, rng)
    planted(len(before) + len(after))
    async with harness.opened(disk_cfg(disk)) as engine:
        for meta, at in zip(after, flip_positions(metas[0], rng), strict=True):
            flip(row_path(disk, meta.key), at, rng)  # damaged after it was indexed
        await harness.serve(engine, queries(metas, {m.key for m in before + after}))
        counted(engine, len(before) + len(after))


async def test_special_files_named_like_rows_are_refused_without_blocking(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    disk, outside, rng = tmp_path / "disk", tmp_path / "outside", random.Random(3)
    metas = await make_rows(registry, disk)
    outside.mkdir()
    # A FIFO: opening it for reading would block forever without O_NONBLOCK.
    os.mkfifo(row_path(disk, random_key(rng)))
    # A sparse file 1 GiB long starting with a valid row: its lengths do not add up, and
    # nothing the size of the file is allocated to find that out.
    sparse = metas[0]
    os.truncate(row_path(disk, sparse.key), 1 << 30)
    # A symlink in place of a valid row (never followed: its target must survive as it was),
    # and a dangling one.
    linked = metas[1]
    target = outside / row_path(disk, linked.key).name
    shutil.move(row_path(disk, linked.key), target)
    target_bytes = target.read_bytes()
    os.symlink(target, row_path(disk, linked.key))
    os.symlink(outside / "nothing", row_path(disk, random_key(rng)))
    # A directory: refused, and left where it is (never removed recursively).
    planted_dir = row_path(disk, random_key(rng))
    planted_dir.mkdir()
    planted(5)

    async with harness.opened(disk_cfg(disk)) as engine:
        counted(engine, 5)
        await harness.serve(engine, queries(metas, {sparse.key, linked.key}))
    assert target.read_bytes() == target_bytes
    assert planted_dir.is_dir()


def permissions_apply() -> bool:
    """False where this process reads files whatever their mode (root, CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_bytes(b"")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        return False


#: Runs pytest with root's power over file modes given up (CI runs as root).
OBEY_FILE_MODES = Path(__file__).parents[1] / "scripts" / "obey_file_modes.py"


async def run_obeying_file_modes(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Run the calling test again, in a pytest process that obeys file modes (see
    tests/scripts/obey_file_modes.py); it must pass there. Its stress figures count here."""
    assert not os.environ.get("ERLLAMA_TESTS_OBEY_FILE_MODES"), (
        "file modes do not apply even with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped"
    )
    argv = [request.node.nodeid, "-q", "--basetemp", str(tmp_path / "obeying")]
    done = await anyio.run_process(
        [sys.executable, str(OBEY_FILE_MODES), *argv],
        cwd=request.config.rootpath,
        check=False,
        stderr=subprocess.STDOUT,
    )
    out = done.stdout.decode(errors="replace")
    if done.returncode == 90:
        pytest.skip(f"root reads files whatever their mode, and {out.strip()}")
    assert done.returncode == 0 and re.search(r"\b1 passed\b", out), out
    for name, n in re.findall(rf"^({FILE}: .+?)\s+(\d+)$", out, re.MULTILINE):
        record(name, int(n))


async def test_unreadable_rows_and_a_directory_locked_mid_run(
    registry: BackendRegistry, harness: Harness, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not permissions_apply():
        # Root reads files whatever their mode: this runs in a process that does not.
        await run_obeying_file_modes(request, tmp_path)
        return
    disk = tmp_path / "disk"
    metas = await make_rows(registry, disk)
    locked = metas[:2]
    for meta in locked:
        row_path(disk, meta.key).chmod(0)
    planted(len(locked) + 1)
    try:
        async with harness.opened(disk_cfg(disk)) as engine:
            # Unreadable rows are not corrupt: skipped (left alone), so a miss, even when a
            # request names one as its parent (it is then looked for on disk).
            counted(engine, 0)
            await harness.serve(engine, queries(metas[:4], {m.key for m in locked}))
            parent = await engine.complete(
                "m", list(locked[0].tokens), max_tokens=MAX_TOKENS, parent_key=locked[0].key.hex()
            )
            assert (parent.text, tuple(parent.token_ids)) == harness.cold[locked[0].tokens]
            await engine.wait_saved()
            disk.chmod(0)  # every read and write in the tier now fails with EACCES
            await harness.serve(engine, queries(metas[4:6], {m.key for m in metas[4:6]}))
            await engine.wait_saved()
            assert engine.cache_counters().save_errors >= 1
            disk.chmod(0o700)
            await harness.serve(engine, queries(metas[6:], set()))
            counted(engine, 0)
    finally:
        disk.chmod(0o700)


async def test_rows_replaced_under_a_running_engine(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    """What root can still do to a running engine's directory: replace row files with
    directories, and swap the tier's directory itself for a symlink elsewhere."""
    disk, elsewhere = tmp_path / "disk", tmp_path / "elsewhere"
    metas = await make_rows(registry, disk)
    elsewhere.mkdir(mode=0o700)
    replaced = metas[:2]
    planted(len(replaced) + 1)
    async with harness.opened(disk_cfg(disk)) as engine:
        for meta in replaced:
            row_path(disk, meta.key).unlink()
            row_path(disk, meta.key).mkdir()
        # The engine works through the directory fd it opened: the swap redirects nothing.
        disk.rename(tmp_path / "moved")
        os.symlink(elsewhere, disk)
        await harness.serve(engine, queries(metas, {m.key for m in replaced}))
        await engine.wait_saved()
        counted(engine, len(replaced))
        assert engine.cache_counters().saves_finish == N_ROWS
    assert list(elsewhere.iterdir()) == []
    assert len(list((tmp_path / "moved").glob("*.kvc"))) == 2 * N_ROWS  # dirs kept, new rows


async def test_a_directory_over_budget_full_of_junk_opens_trimmed(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    disk, rng = tmp_path / "disk", random.Random(4)
    metas = await make_rows(registry, disk)
    for _ in range(20):
        row_path(disk, random_key(rng)).write_bytes(rng.randbytes(rng.randrange(8192)))
    planted(20)
    budget = sum(m.file_size for m in metas) // 2
    # No saves while serving: the surviving rows are then exactly the newer half.
    cfg = disk_cfg(disk, disk_bytes=budget, policy=erllama.CachePolicy(save_finish=False))
    async with harness.opened(cfg) as engine:
        await engine.wait_saved()
        c = engine.cache_counters()
        assert c.bytes_disk <= budget and c.evictions == N_ROWS // 2
        assert sum(p.stat().st_size for p in disk.glob("*.kvc")) == c.bytes_disk
        counted(engine, 20)
        await harness.serve(engine, queries(metas, {m.key for m in metas[: N_ROWS // 2]}))


async def test_a_disk_that_fills_up_and_frees_mid_run(
    registry: BackendRegistry,
    harness: Harness,
    small_disk: SmallDisk,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metas = await make_rows(registry, small_disk.path)
    async with harness.opened(disk_cfg(small_disk.path)) as engine:
        await harness.serve(engine, queries(metas[:3], set()))
        await engine.wait_saved()  # those saves went through
        small_disk.fill()
        await harness.serve(engine, queries(metas[3:6], set()))  # rows still read
        await engine.wait_saved()
        c = engine.cache_counters()
        assert c.save_errors == 3 and c.saves_finish == 3
        small_disk.free()
        await harness.serve(engine, queries(metas[6:], set()))
        await engine.wait_saved()
        c = engine.cache_counters()
        assert c.save_errors == 3 and c.saves_finish == 3 + N_ROWS - 6
        record(f"{FILE}: failed writes (full disk)", c.save_errors)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The first failure with its traceback, the other two in one summary when it closed.
    assert [r.exc_info is not None for r in errors] == [True, False]
    assert "No space left on device" in errors[1].getMessage()


#: The mixed rounds below: each damages a random part of a fresh directory in random ways,
#: before the engine opens or while it runs.
ROUNDS = 16
ROWS_PER_ROUND = 16
DAMAGE = ("truncate", "flip", "noise", "empty", "symlink", "fifo", "directory")


def damage(path: Path, kind: str, meta: RowMeta, rng: random.Random) -> None:
    if kind == "truncate":
        os.truncate(path, rng.randrange(meta.file_size))
    elif kind == "flip":
        offsets = [*range(HIT_COUNT_OFFSET), *range(HIT_COUNT_OFFSET + 4, meta.file_size)]
        flip(path, rng.choice(offsets), rng)
    elif kind in ("noise", "empty"):
        path.write_bytes(
            rng.randbytes(rng.randrange(1, 2 * meta.file_size)) if kind == "noise" else b""
        )
    else:
        path.unlink()
        if kind == "symlink":
            os.symlink(path.parent / "nowhere", path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()


async def test_random_damage_before_and_during_a_run(
    registry: BackendRegistry, harness: Harness, tmp_path: Path
) -> None:
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        disk = tmp_path / f"round{round_}"
        metas = await make_rows(registry, disk, ROWS_PER_ROUND)
        hit = rng.sample(metas, rng.randrange(1, ROWS_PER_ROUND))
        kinds = {m.key: rng.choice(DAMAGE) for m in hit}
        mid_run = {m.key for m in hit if rng.random() < 0.5}
        for meta in hit:
            if meta.key not in mid_run:
                damage(row_path(disk, meta.key), kinds[meta.key], meta, rng)
        planted(len(hit))
        async with harness.opened(disk_cfg(disk)) as engine:
            for meta in hit:
                if meta.key in mid_run:
                    damage(row_path(disk, meta.key), kinds[meta.key], meta, rng)
            await harness.serve(engine, queries(metas, set(kinds)))
            assert engine.cache_counters().corrupt_files == len(hit), (round_, kinds)
        record(f"{FILE}: mixed damage rounds")
