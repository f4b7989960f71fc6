"""What the exactness grid costs a cold prefill (issue 25), measured against the code before it.

docs/caching.md "Exactness": prefill chunks cover ``[jG, (j+1)G)`` of the absolute positions
and each chunk is its own ``llama_decode``. Before, a prompt was cut into chunks of
``prefill_chunk`` (128 by default) from wherever its prefill started. This script times a cold
prefill (cache off, no live reuse, ``max_tokens=1``: the time to the first token) of the same
prompts with

- ``before``: the source tree of the commit before the grid (``git archive BEFORE src``),
- ``grid64``: today's default on CPU (G = 64),
- ``grid128``: today's code with G = 128 (the old default chunk, anchored),

each in its own process (llama.cpp's OpenMP threads make a second process-local thread slower,
see bench/README.md), alternating which variant runs first, round after round. It prints one
JSON object: per variant the median prefill tok/s over all rounds, and each variant's ratio to
``before``.

    python bench/prefill_grid.py                 # 2,000-token prompts, 3 rounds
    python bench/prefill_grid.py --tokens 512 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The last commit before the grid (main before issue 25).
BEFORE = "9184cd1"
VARIANTS = {"before": None, "grid64": 64, "grid128": 128}


async def _child(tokens: int, chunk: int | None, reps: int) -> dict[str, Any]:
    import erllama
    from erllama.bundled import bundled_model_path

    sys.path.insert(0, str(ROOT / "bench"))
    from common import model_config, prose

    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False))
    async with erllama.open_engine(cfg) as engine:
        path = bundled_model_path()
        assert path is not None, "SmolLM2 is not installed"
        mc = model_config(path, live=False)
        if chunk is not None:
            import attrs

            mc = attrs.evolve(mc, prefill_chunk=chunk)
        mid = await engine.load_model("m", mc)
        await engine.complete(mid, "Warm-up.", max_tokens=2)
        rates = []
        for rep in range(reps):
            # A prompt per repetition; the same prompts in every variant and process.
            ids = await engine.tokenize(mid, prose(f"grid-{rep}", tokens // 8))
            assert len(ids) >= tokens, len(ids)
            prompt = ids[:tokens]
            t0 = time.perf_counter()
            done = await engine.complete(mid, prompt, max_tokens=1)
            elapsed = time.perf_counter() - t0
            assert done.cache_hit_kind == "cold"
            rates.append(tokens / elapsed)
    return {"prefill_tok_per_s": statistics.median(rates), "all": rates}


def _run_child(src: Path, variant: str, tokens: int, reps: int) -> dict[str, Any]:
    chunk = VARIANTS[variant]
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); "
        "sys.path.insert(0, sys.argv[2]); import prefill_grid as g; "
        "print(json.dumps(asyncio.run(g._child(int(sys.argv[3]), "
        "None if sys.argv[4] == '-' else int(sys.argv[4]), int(sys.argv[5])))))"
    )
    argv = [sys.executable, "-c", code, str(src), str(ROOT / "bench"), str(tokens)]
    argv += ["-" if chunk is None else str(chunk), str(reps)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="prompts per process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "before.tar"
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", "-o", str(archive), BEFORE, "src"], check=True
        )
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "before", filter="data")
        sources = {"before": Path(tmp) / "before" / "src"}
        sources.update({v: ROOT / "src" for v in VARIANTS if v != "before"})
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for v in order:
                rates[v].extend(_run_child(sources[v], v, args.tokens, args.reps)["all"])
                print(
                    f"round {r + 1} {v}: {statistics.median(rates[v]):.0f} tok/s", file=sys.stderr
                )
    med = {v: statistics.median(x) for v, x in rates.items()}
    print(
        json.dumps(
            {
                "prompt_tokens": args.tokens,
                "rounds": args.rounds,
                "prompts_per_process": args.reps,
                "prefill_tok_per_s": med,
                "over_before": {v: med[v] / med["before"] for v in VARIANTS},
                "all": rates,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
