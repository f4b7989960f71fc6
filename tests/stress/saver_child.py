"""The child engine of test_kill_mid_save: saves cache rows continuously until it is killed.

Run as a script: ``python saver_child.py DISK_DIR ANYIO_BACKEND SEED``. It imports everything,
prints ``ready``, waits for a line on stdin (so that a parent can start it early without it
touching the directory yet), opens an engine on DISK_DIR, prints ``saving`` and runs requests
forever: every request makes a cold save, continued saves and a finish save, on the disk
tier only. Each publish is held back a little after its temp is written, so that a kill at a
random moment often finds a complete temp not yet linked into place (stub states are small
and would otherwise be written too fast to be caught). The test imports this module too, for
the same configuration, so the parent's engine computes the same keys.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import anyio

import erllama
from erllama.backends import stub
from erllama.backends.stub import _word
from erllama.cache.tiers import FileTier

POLICY = erllama.CachePolicy(
    min_tokens=8,
    cold_min_tokens=48,
    boundary_trim_tokens=8,
    boundary_align_tokens=32,
    continued_interval=16,
)
N_PROMPTS = 24
#: Held between writing a temp and linking it (seconds).
PUBLISH_DELAY_S = 0.002


def config(disk: Path, **cache: object) -> erllama.EngineConfig:
    fields: dict[str, object] = {
        "ram_bytes": 0,
        "ram_file_dir": None,
        "disk_dir": disk,
        "writer_queue": 64,
        "policy": POLICY,
    }
    fields.update(cache)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))  # type: ignore[arg-type]


def model() -> erllama.ModelConfig:
    # No live KV: every warm start in the parent is a row read from disk.
    return erllama.ModelConfig(backend="stub", n_ctx=1024, keep_live_kv=False)


def prompt(i: int) -> str:
    return " ".join(_word(7 * i + j) for j in range(64 + 16 * (i % 8)))


def slow_publishing() -> None:
    publish = FileTier.publish

    def held(self: FileTier, tmp: Path, key: bytes) -> object:
        time.sleep(PUBLISH_DELAY_S)
        return publish(self, tmp, key)

    FileTier.publish = held  # type: ignore[method-assign, assignment]


async def main(disk: Path, seed: int) -> None:
    slow_publishing()
    rng = random.Random(seed)
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    registry = erllama.make_backend_registry({"stub": stub}, autoload=False)
    async with erllama.open_engine(config(disk), backends=registry) as engine:
        mid = await engine.load_model("m", model())
        print("saving", flush=True)
        while True:
            n = rng.randrange(N_PROMPTS)
            await engine.complete(mid, prompt(n), max_tokens=rng.randrange(8, 64))


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), int(sys.argv[3]), backend=sys.argv[2])
