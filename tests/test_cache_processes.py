"""Two engine processes sharing one cache directory, saving the same rows at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from erllama.cache.format import read_row

SCRIPT = textwrap.dedent(
    """
    import sys, pathlib, anyio, erllama
    from erllama.backends import stub
    disk = pathlib.Path(sys.argv[1])

    async def main():
        cfg = erllama.EngineConfig(cache=erllama.CacheConfig(
            ram_bytes=0, ram_file_dir=None, disk_dir=disk, writer_queue=64,
            policy=erllama.CachePolicy(min_tokens=4, cold_min_tokens=16,
                                       boundary_trim_tokens=4, boundary_align_tokens=8)))
        reg = erllama.make_backend_registry({"stub": stub}, autoload=False)
        async with erllama.open_engine(cfg, backends=reg) as engine:
            mid = await engine.load_model("m", erllama.ModelConfig(backend="stub", n_ctx=512))
            print("ready", flush=True)
            # Both processes start saving when the test says go (a line on stdin).
            assert (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() == "go"
            keys = []
            for i in range(20):
                prompt = " ".join(f"ka{'be' * (i % 5)}" for _ in range(20 + i))
                r = await engine.complete(mid, prompt, max_tokens=3)
                keys.append(r.finish_key)
            await engine.wait_saved()
            print(",".join(keys))

    anyio.run(main)
    """
)


def test_two_processes_saving_the_same_keys_end_with_one_valid_file_each(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    script = tmp_path / "saver.py"
    script.write_text(SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(disk)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    # Both engines open, their models loaded: then both start at once.
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line == "ready\n", p.communicate(timeout=60)[1]  # else it failed: its stderr
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    keys_a, keys_b = (out.strip().split(",") for out, _ in outputs)
    assert keys_a == keys_b  # same model, same prompts: the same rows
    files = sorted(disk.glob("*.kvc"))
    assert {f.name[:-4] for f in files} >= set(keys_a)
    for f in files:
        read_row(f, bytes.fromhex(f.name[:-4]))  # every file is a complete, valid row
    assert not list(disk.glob("*.tmp"))
