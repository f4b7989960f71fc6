"""Scenario: does a model slow down when other models are loaded beside it? (issue 23)

llama-cpp-python built with OpenMP gives every thread that calls ``llama_decode`` its own
OpenMP team: once the teams' threads outnumber the cores, libgomp stops spinning and
llama.cpp's threads sleep and wake at every operation. erllama therefore computes every
model's graphs on one thread (``compute_thread`` ``shared``, erllama/backends/llama_compute.py);
``own`` computes each model on its own thread, as before, and is measured beside it.

For 1, 2 and 3 models loaded in one engine (the bundled GGUF under several ids, cache off),
each configuration in a process of its own (so no OpenMP pool survives from another), every
model is used once first (its thread's team exists), then:

- **one at a time**: each model prefills a 256-token prompt and decodes 128 tokens greedily
  while the others are idle; prefill and decode tok/s per model;
- **together** (2 and 3 models): every model decodes 128 tokens at the same time; the
  aggregate decode tok/s.

Configurations alternate over four rounds (1, 2, 3 then 3, 2, 1, each in both compute
modes); figures are medians.
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
#: ModelConfig.options["compute_thread"]: the default (one compute thread for every model)
#: and the behaviour before it (each model computes on its own thread).
MODES = ("shared", "own")
PROMPT_TOKENS = 256
DECODE_TOKENS = 128


def _plan(ctx: Any) -> dict[str, int]:
    return {"rounds": 1 if ctx.quick else 4}


def steps(ctx: Any) -> int:
    return _plan(ctx)["rounds"] * len(COUNTS) * len(MODES)


async def _child(model_path: str, threads: int, k: int, mode: str = "shared") -> dict[str, Any]:
    import anyio
    from common import cache_config, model_config, prose, timed

    import erllama

    async def decode(engine: erllama.Engine, mid: str, prompt: list[int]) -> dict[str, float]:
        t = await timed(engine, mid, prompt, max_tokens=DECODE_TOKENS)
        rate, count = t.decode_tok_per_s, len(t.token_ids)
        assert rate is not None
        return {
            "prefill_tok_per_s": len(prompt) / t.ttft_s,
            "decode_tok_per_s": rate,
            "tokens": count,
            "span_s": (count - 1) / rate,
        }

    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mc = model_config(
            Path(model_path), threads=threads, live=False, options={"compute_thread": mode}
        )
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


def _run_child(ctx: Any, k: int, mode: str) -> dict[str, Any]:
    bench = Path(__file__).resolve().parent.parent
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); "
        "sys.path.insert(0, sys.argv[1] + '/scenarios'); import models as m; "
        "print(json.dumps(asyncio.run(m._child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "
        "sys.argv[5]))))"
    )
    argv = [
        sys.executable, "-c", code, str(bench), str(ctx.model_path), str(ctx.threads), str(k), mode
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{k} models: the child failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _rows(runs: dict[int, list[dict[str, Any]]]) -> tuple[float, float, list[dict[str, Any]]]:
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
    return base_decode, base_prefill, rows


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {k: [] for k in COUNTS} for m in MODES}
    for r in range(plan["rounds"]):
        order = [(mode, k) for k in COUNTS for mode in MODES]
        for mode, k in order if r % 2 == 0 else order[::-1]:
            runs[mode][k].append(_run_child(ctx, k, mode))
            ctx.step(f"{k} model(s), compute thread {mode}, round {r + 1}")
    out: dict[str, Any] = {
        "rounds": plan["rounds"],
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "modes": {},
    }
    for mode in MODES:
        base_decode, base_prefill, rows = _rows(runs[mode])
        out["modes"][mode] = {
            "one_model_decode_tok_per_s": base_decode,
            "one_model_prefill_tok_per_s": base_prefill,
            "rows": rows,
            "runs": {str(k): v for k, v in runs[mode].items()},
        }
    shared, own = out["modes"]["shared"], out["modes"]["own"]
    # One model: does the hand-over to the compute thread cost anything?
    out["one_model_shared_vs_own"] = {
        "decode": shared["one_model_decode_tok_per_s"] / own["one_model_decode_tok_per_s"],
        "prefill": shared["one_model_prefill_tok_per_s"] / own["one_model_prefill_tok_per_s"],
    }
    # The default's figures at the top level, as before.
    out.update({k: v for k, v in shared.items() if k != "runs"})
    return out


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ratio = result.get("one_model_shared_vs_own")
    if ratio is not None:
        own = result["modes"]["own"]
        out.append(
            {
                "figure": "1 model: decode and prefill on the shared compute thread vs on its own",
                "value": min(ratio["decode"], ratio["prefill"]),
                "display": f"decode {ratio['decode']:.1%}, prefill {ratio['prefill']:.1%} "
                f"({result['one_model_decode_tok_per_s']:.0f} vs "
                f"{own['one_model_decode_tok_per_s']:.0f} tok/s)",
                "target": ">= 99%",
                "met": min(ratio["decode"], ratio["prefill"]) >= 0.99,
            }
        )
        for row in own["rows"]:
            if row["models"] == 2:
                out.append(
                    {
                        "figure": "2 models loaded, each computing on its own thread (before): "
                        "worst decode vs one model",
                        "value": row["worst_decode_vs_one_model"],
                        "display": f"{row['worst_decode_vs_one_model']:.0%}",
                        "target": None,
                        "met": None,
                    }
                )
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
        "each configuration in a process of its own. Compute thread: `shared` (the default: "
        "one thread computes for every model) or `own` (each model on its own thread).",
        "",
        "| compute thread | models loaded | decode tok/s of each, others idle | prefill tok/s "
        "of each | worst decode vs one model | decoding together, aggregate |",
        "|---|---:|---|---|---:|---:|",
    ]
    modes = result.get("modes") or {"shared": result}
    for mode, rows in ((m, r["rows"]) for m, r in modes.items()):
        for row in rows:
            together = row["together_aggregate_tok_per_s"]
            lines.append(
                f"| {mode} | {row['models']} | "
                f"{', '.join(f'{x:.0f}' for x in row['decode_alone_tok_per_s'])} | "
                f"{', '.join(f'{x:.0f}' for x in row['prefill_alone_tok_per_s'])} | "
                f"{row['worst_decode_vs_one_model']:.0%} | "
                f"{'-' if together is None else f'{together:.0f} tok/s'} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}
