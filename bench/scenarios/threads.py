"""Scenario: how many llama.cpp threads serve best, on an idle machine and a loaded one.

``ModelConfig.n_threads`` decides the default's value. For each candidate (1, half the
logical cores, all of them) erllama prefills a 512-token prompt and decodes 64 tokens
greedily, first with the machine otherwise idle, then with one busy process per half of the
cores (a plain Python spin loop started by the scenario, killed after), the way a shared
host or a busy application looks. llama.cpp's threads meet at a barrier after every
operation, so a thread that loses its core stalls all of them: the count that is fastest
idle need not be fastest loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio
from common import cache_config, median, model_config, prompt_of_length, timed

import erllama

NAME = "threads"
TITLE = "llama.cpp threads: prefill and decode by thread count, idle and loaded"
SPIN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def _candidates() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, max(1, cores // 2), cores})


def _plan(ctx: Any) -> dict[str, Any]:
    return {
        "reps": 1 if ctx.quick else 3,
        "prompt": 256 if ctx.quick else 512,
        "tokens": 32 if ctx.quick else 64,
    }


def steps(ctx: Any) -> int:
    return len(_candidates()) * 2 * _plan(ctx)["reps"]


async def _measure(ctx: Any, threads: int, prompt_len: int, n: int) -> dict[str, float]:
    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model(
            "m", model_config(ctx.model_path, threads=threads, live=False)
        )
        prompt = await prompt_of_length(engine, mid, prompt_len, "threads")
        await engine.complete(mid, "Warm-up.", max_tokens=4)
        t = await timed(engine, mid, prompt, max_tokens=n)
        assert t.decode_tok_per_s is not None
        return {"prefill_tok_per_s": prompt_len / t.ttft_s, "decode_tok_per_s": t.decode_tok_per_s}


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    cores = os.cpu_count() or 1
    rows = []
    for loaded in (False, True):
        spinners = []
        if loaded:
            spinners = [
                subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(max(1, cores // 2))
            ]
        try:
            for threads in _candidates():
                runs = []
                for rep in range(plan["reps"]):
                    runs.append(anyio.run(_measure, ctx, threads, plan["prompt"], plan["tokens"]))
                    ctx.step(f"{'loaded' if loaded else 'idle'} t={threads} {rep + 1}")
                rows.append(
                    {
                        "loaded": loaded,
                        "threads": threads,
                        "prefill_tok_per_s": median([r["prefill_tok_per_s"] for r in runs]),
                        "decode_tok_per_s": median([r["decode_tok_per_s"] for r in runs]),
                    }
                )
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    return {
        "cores": cores,
        "busy_processes_when_loaded": max(1, cores // 2),
        "prompt_tokens": plan["prompt"],
        "tokens": plan["tokens"],
        "reps": plan["reps"],
        "rows": rows,
    }


def _best(result: dict[str, Any], loaded: bool, key: str) -> dict[str, Any]:
    return max((r for r in result["rows"] if r["loaded"] is loaded), key=lambda r: r[key])


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for loaded in (False, True):
        best = _best(result, loaded, "decode_tok_per_s")
        rows = [r for r in result["rows"] if r["loaded"] is loaded]
        out.append(
            {
                "figure": f"decode tok/s by n_threads, {'loaded' if loaded else 'idle'} machine",
                "value": best["threads"],
                "display": ", ".join(f"{r['threads']}: {r['decode_tok_per_s']:.0f}" for r in rows)
                + f" (best {best['threads']})",
                "target": None,
                "met": None,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['cores']} logical cores; loaded = {result['busy_processes_when_loaded']} "
        f"busy process(es); {result['prompt_tokens']}-token prefill, {result['tokens']} greedy "
        f"tokens, median of {result['reps']}.",
        "",
        "| machine | n_threads | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {'loaded' if r['loaded'] else 'idle'} | {r['threads']} | "
            f"{r['prefill_tok_per_s']:.0f} | {r['decode_tok_per_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}
