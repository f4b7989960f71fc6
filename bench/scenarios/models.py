"""Scenario: does a model slow down when other models are loaded beside it? (issue 23)

llama-cpp-python built with OpenMP gives every thread that calls ``llama_decode`` its own
OpenMP team, and erllama runs each model on its own thread: once the teams' threads outnumber
the cores, libgomp stops spinning and llama.cpp's threads sleep and wake at every operation.

For 1, 2 and 3 models loaded in one engine (the bundled GGUF under several ids, cache off),
each configuration in a process of its own (so no OpenMP pool survives from another), every
model is used once first (its thread's team exists), then:

- **one at a time**: each model prefills a 256-token prompt and decodes 64 tokens greedily
  while the others are idle; prefill and decode tok/s per model;
- **together** (2 and 3 models): every model decodes 64 tokens at the same time; the
  aggregate decode tok/s.

Configurations alternate over two rounds (1, 2, 3 then 3, 2, 1); figures are medians.
Targets (issue 23): each model with the others idle >= 97% of the one-model figure, and
the concurrent aggregate >= the one-model figure. Only one GGUF ships with erllama, so "two
different GGUFs" is the same file under two ids here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import median

NAME = "models"
TITLE = "Several models in one engine: speed with the others loaded, one at a time and together"
COUNTS = (1, 2, 3)
PROMPT_TOKENS = 256
DECODE_TOKENS = 64


def _plan(ctx: Any) -> dict[str, int]:
    return {"rounds": 1 if ctx.quick else 2}


def steps(ctx: Any) -> int:
    return _plan(ctx)["rounds"] * len(COUNTS)


async def _child(model_path: str, threads: int, k: int) -> dict[str, Any]:
    import anyio
    from common import cache_config, model_config, prose

    import erllama

    async def decode(engine: erllama.Engine, mid: str, prompt: list[int]) -> dict[str, float]:
        t0 = time.perf_counter()
        first = last = None
        count = 0
        async with await engine.infer(mid, prompt, max_tokens=DECODE_TOKENS) as stream:
            async for ev in stream:
                if isinstance(ev, erllama.Token):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
        assert first is not None and last is not None and count > 1
        return {
            "prefill_tok_per_s": len(prompt) / (first - t0),
            "decode_tok_per_s": (count - 1) / (last - first),
            "tokens": count,
            "span_s": last - first,
        }

    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mc = model_config(Path(model_path), threads=threads, live=False)
        mids = [await engine.load_model(f"m{i}", mc) for i in range(k)]
        for mid in mids:
            await engine.complete(mid, "Warm-up.", max_tokens=4)
        ids = await engine.tokenize(mids[0], prose("models", PROMPT_TOKENS // 8))
        prompt = ids[:PROMPT_TOKENS]
        alone = [await decode(engine, mid, prompt) for mid in mids]
        together: dict[str, Any] | None = None
        if k > 1:
            runs: list[dict[str, float]] = []

            async def one(mid: str) -> None:
                runs.append(await decode(engine, mid, prompt))

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for mid in mids:
                    tg.start_soon(one, mid)
            wall = time.perf_counter() - t0
            together = {
                "aggregate_decode_tok_per_s": sum(r["tokens"] - 1 for r in runs)
                / max(r["span_s"] for r in runs),
                "wall_s": wall,
                "runs": runs,
            }
    return {"models": k, "alone": alone, "together": together}


def _run_child(ctx: Any, k: int) -> dict[str, Any]:
    bench = Path(__file__).resolve().parent.parent
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); "
        "sys.path.insert(0, sys.argv[1] + '/scenarios'); import models as m; "
        "print(json.dumps(asyncio.run(m._child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))))"
    )
    argv = [sys.executable, "-c", code, str(bench), str(ctx.model_path), str(ctx.threads), str(k)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{k} models: the child failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in COUNTS}
    for r in range(plan["rounds"]):
        for k in COUNTS if r % 2 == 0 else COUNTS[::-1]:
            runs[k].append(_run_child(ctx, k))
            ctx.step(f"{k} model(s), round {r + 1}")
    base_decode = median([a["decode_tok_per_s"] for x in runs[1] for a in x["alone"]])
    base_prefill = median([a["prefill_tok_per_s"] for x in runs[1] for a in x["alone"]])
    rows = []
    for k in COUNTS:
        per_model = [median([x["alone"][i]["decode_tok_per_s"] for x in runs[k]]) for i in range(k)]
        per_model_prefill = [
            median([x["alone"][i]["prefill_tok_per_s"] for x in runs[k]]) for i in range(k)
        ]
        together = [x["together"]["aggregate_decode_tok_per_s"] for x in runs[k] if x["together"]]
        rows.append(
            {
                "models": k,
                "decode_alone_tok_per_s": per_model,
                "prefill_alone_tok_per_s": per_model_prefill,
                "worst_decode_vs_one_model": min(per_model) / base_decode,
                "worst_prefill_vs_one_model": min(per_model_prefill) / base_prefill,
                "together_aggregate_tok_per_s": median(together) if together else None,
                "together_vs_one_model": median(together) / base_decode if together else None,
            }
        )
    return {
        "rounds": plan["rounds"],
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "one_model_decode_tok_per_s": base_decode,
        "one_model_prefill_tok_per_s": base_prefill,
        "rows": rows,
        "runs": {str(k): v for k, v in runs.items()},
    }


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in result["rows"]:
        k = row["models"]
        if k == 1:
            continue
        worst = row["worst_decode_vs_one_model"]
        out.append(
            {
                "figure": f"{k} models loaded: each model's decode with the others idle, "
                "worst vs one model alone",
                "value": worst,
                "display": f"{worst:.0%} ({', '.join(f'{x:.0f}' for x in row['decode_alone_tok_per_s'])}"
                f" tok/s vs {result['one_model_decode_tok_per_s']:.0f}); prefill "
                f"{row['worst_prefill_vs_one_model']:.0%}",
                "target": ">= 97%",
                "met": worst >= 0.97,
            }
        )
        together = row["together_vs_one_model"]
        out.append(
            {
                "figure": f"{k} models decoding together: aggregate vs one model alone",
                "value": together,
                "display": f"{row['together_aggregate_tok_per_s']:.0f} tok/s ({together:.2f}x)",
                "target": ">= 1.0x",
                "met": together >= 1.0,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Cache off; each model: {result['prompt_tokens']}-token prefill, "
        f"{result['decode_tokens']} greedy tokens; medians over {result['rounds']} round(s), "
        "each configuration in a process of its own.",
        "",
        "| models loaded | decode tok/s of each, others idle | prefill tok/s of each | "
        "worst decode vs one model | decoding together, aggregate |",
        "|---:|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        together = row["together_aggregate_tok_per_s"]
        lines.append(
            f"| {row['models']} | {', '.join(f'{x:.0f}' for x in row['decode_alone_tok_per_s'])} | "
            f"{', '.join(f'{x:.0f}' for x in row['prefill_alone_tok_per_s'])} | "
            f"{row['worst_decode_vs_one_model']:.0%} | "
            f"{'-' if together is None else f'{together:.0f} tok/s'} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}
