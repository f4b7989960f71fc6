"""Crash safety with real processes: a writer killed by SIGKILL at random points never leaves a
row that is served damaged, never loses a row it reported published, and leaves no temp that a
start-up scan does not remove."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from erllama.cache.tiers import FileTier

RUNS = 30
N_KEYS = 40

# Shared by the writer (exec'd there) and this test: rows are derived from a small integer,
# so the parent knows exactly what payload each key must have.
ROWS = textwrap.dedent(
    """
    import random
    from erllama.cache.key import Namespace

    NS = Namespace(b"\\x03" * 32, 2, b"\\x04" * 32)
    REASONS = ("cold", "continued", "finish", "evict", "shutdown")

    def row(k):
        rng = random.Random(k)
        tokens = [k] + [rng.randrange(50_000) for _ in range(rng.randrange(64))]
        size = rng.choice((0, 1, 4096, rng.randrange(1 << 20), rng.randrange(4 << 20)))
        return tokens, rng.choice(REASONS), rng.randbytes(size)
    """
)

WRITER = ROWS + textwrap.dedent(
    """
    import os, sys
    from erllama.cache.format import encode_row
    from erllama.cache.tiers import FileTier

    tier = FileTier("disk", sys.argv[1])
    tier.open()
    log = open(sys.argv[2], "ab")
    pick = random.Random(int(sys.argv[3]))
    print("ready", flush=True)
    sys.stdin.readline()
    while True:
        tokens, reason, payload = row(pick.randrange(N_KEYS))
        key = NS.key(tokens)
        tmp = tier.write_tmp(key, encode_row(NS, tokens, reason, payload), payload)
        tier.publish(tmp, key)
        # Logged only once publish has returned: every logged key must survive the kill.
        log.write(key.hex().encode() + b"\\n")
        log.flush()
        os.fsync(log.fileno())
    """
).replace("N_KEYS", str(N_KEYS))


@pytest.fixture(scope="module")
def expected() -> dict[bytes, int]:
    """key -> xxh3_64 of the payload the writer produces for it."""
    scope: dict[str, Any] = {}
    exec(ROWS, scope)
    out = {}
    for k in range(N_KEYS):
        tokens, _, payload = scope["row"](k)
        out[scope["NS"].key(tokens)] = xxhash.xxh3_64_intdigest(payload)
    assert len(out) == N_KEYS
    return out


def logged_keys(log: Path) -> set[bytes]:
    # A line cut short by the kill was never complete, so it was never a promise.
    lines = log.read_bytes().split(b"\n")[:-1] if log.exists() else []
    return {bytes.fromhex(line.decode()) for line in lines}


@pytest.mark.slow
def test_sigkilled_writer_never_leaves_a_bad_or_lost_row(
    tmp_path: Path, expected: dict[bytes, int]
) -> None:
    rows, log = tmp_path / "rows", tmp_path / "published.log"
    errors = tmp_path / "stderr"
    rng = random.Random(1234)

    def spawn(seed: int) -> subprocess.Popen[bytes]:
        with open(errors, "ab") as err:
            return subprocess.Popen(
                [sys.executable, "-c", WRITER, str(rows), str(log), str(seed)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )

    upcoming = spawn(0)
    for run in range(RUNS):
        child = upcoming
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"ready\n", errors.read_text()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        # Start the next writer now: its interpreter start-up overlaps this run.
        if run + 1 < RUNS:
            upcoming = spawn(run + 1)
        time.sleep(rng.uniform(0.0, 0.3))  # a random point to kill it at (jitter)
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            stream.close()
        assert child.returncode == -signal.SIGKILL, errors.read_text()

        with FileTier("disk", rows) as tier:
            metas, corrupt = tier.scan(stale_tmp_age_s=0)
            # A killed writer can leave a temp, never a damaged row: the final name only
            # appears (link) once the data is complete and fsynced.
            assert corrupt == 0
            assert not [p for p in rows.iterdir() if p.name.endswith(".tmp")]
            on_disk = set()
            for meta in metas:
                _, payload = tier.read(meta.key)
                assert xxhash.xxh3_64_intdigest(payload) == expected[meta.key]
                on_disk.add(meta.key)
        assert logged_keys(log) <= on_disk, f"run {run}: a published row was lost"
