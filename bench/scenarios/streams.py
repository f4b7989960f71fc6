"""Scenario: concurrent streams on one model, and a short request behind a long prefill.

**Batching.** N = 1, 2, 4, 8 concurrent greedy streams on one model with ``n_seq_max = N``
(cache off, no live-KV reuse), against the plain low-level loop of ``rawloop.py`` that
batches the same N prompts: one ``llama_decode`` per step for all N sequences. Aggregate
decode rate = tokens produced after every stream had its first token / time from then to
the last token, for both. erllama's tokens are compared with the loop's, per sequence.

**Contention.** With ``n_seq_max = 2``, a short chat request (~48 tokens) arrives while a
4,000-token prompt is being prefilled. Its time to first token is compared with the same
request on an idle model, with the default prefill chunk (``max(64, n_batch / 4)``) and with
the chunk set to ``n_batch`` (no slicing beyond the batch), to show what the chunk buys.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from common import N_BATCH, cache_config, median, model_config, prompt_of_length
from rawloop import RawLoop

import erllama

NAME = "streams"
TITLE = "Concurrent streams vs a plain batched loop; a short request behind a long prefill"
N_CTX = 1024
LONG_CTX = 4608
QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a steam engine works, step by step, in detail.",
    "Describe a walk through a busy market in a coastal town.",
    "Tell the history of a small mountain village over two centuries.",
    "Write a letter from a sailor to his family after a long voyage.",
    "Describe how bread is baked in a traditional wood-fired oven.",
    "Write a detailed guide to planting a vegetable garden in spring.",
    "Tell a story about a clockmaker who builds a clock that runs backwards.",
]


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {"ns": (1, 4), "tokens": 32, "reps": 1, "long": 1500, "contention_reps": 1}
    return {"ns": (1, 2, 4, 8), "tokens": 96, "reps": 3, "long": 4000, "contention_reps": 2}


def steps(ctx: Any) -> int:
    plan = _plan(ctx)
    return len(plan["ns"]) * plan["reps"] * 4 + 2 * 2


def _aggregate(first: list[float], stamps: list[list[float]]) -> float | None:
    """Tokens after every stream's first one, per second of that phase."""
    start = max(first)
    after = [t for s in stamps for t in s if t > start]
    if not after:
        return None
    end = max(after)
    return len(after) / (end - start) if end > start else None


async def _prompts(ctx: Any, n: int) -> list[list[int]]:
    async with erllama.open_engine(erllama.EngineConfig(cache=cache_config(None))) as e:
        mid = await e.load_model(
            "m", model_config(ctx.model_path, threads=ctx.threads, n_ctx=N_CTX)
        )
        return [
            await e.apply_chat_template(mid, [{"role": "user", "content": q}])
            for q in QUESTIONS[:n]
        ]


async def _erllama(ctx: Any, prompts: list[list[int]], n: int) -> dict[str, Any]:
    n_seq = len(prompts)
    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mc = model_config(
            ctx.model_path, threads=ctx.threads, live=False, n_ctx=N_CTX, n_seq_max=n_seq
        )
        mid = await engine.load_model("m", mc)
        await engine.complete(mid, "Warm-up.", max_tokens=4)
        first: list[float] = [0.0] * n_seq
        stamps: list[list[float]] = [[] for _ in range(n_seq)]
        tokens: list[list[int]] = [[] for _ in range(n_seq)]
        concurrent = 0

        async def one(i: int) -> None:
            nonlocal concurrent
            stream = await engine.infer(mid, prompts[i], max_tokens=n)
            async with stream:
                async for ev in stream:
                    if isinstance(ev, erllama.Token):
                        now = time.perf_counter()
                        if not stamps[i]:
                            first[i] = now
                            concurrent = max(concurrent, engine.model_info(mid).running)
                        stamps[i].append(now)
                        tokens[i].append(ev.token_id)

        async with anyio.create_task_group() as tg:
            for i in range(n_seq):
                tg.start_soon(one, i)
    return {
        "tok_per_s": _aggregate(first, stamps),
        "tokens": tokens,
        "max_running": concurrent,
    }


def _loop(loop: RawLoop, prompts: list[list[int]], n: int) -> dict[str, Any]:
    r = loop.generate(prompts, n)
    stamps = r["stamps"]
    n_seq = len(prompts)
    rate = n_seq * (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"tok_per_s": rate, "tokens": r["tokens"]}


async def _contended(
    ctx: Any, long: list[int], short: list[int], chunk: int | None
) -> dict[str, Any]:
    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mc = model_config(
            ctx.model_path,
            threads=ctx.threads,
            live=False,
            n_ctx=LONG_CTX,
            n_seq_max=2,
            prefill_chunk=chunk,
        )
        mid = await engine.load_model("m", mc)
        await engine.complete(mid, "Warm-up.", max_tokens=4)
        t0 = time.perf_counter()
        alone = await engine.complete(mid, short, max_tokens=1)
        alone_s = time.perf_counter() - t0
        result: dict[str, Any] = {}

        async def long_request() -> None:
            t = time.perf_counter()
            await engine.complete(mid, long, max_tokens=1)
            result["long_s"] = time.perf_counter() - t

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_request)
            await anyio.sleep(1.0)  # the long prompt is well into its prefill
            assert engine.status(mid) == "prefilling"
            t = time.perf_counter()
            stream = await engine.infer(mid, short, max_tokens=1)
            async with stream:
                async for ev in stream:
                    if isinstance(ev, erllama.Token):
                        result["contended_s"] = time.perf_counter() - t
            result["long_still_prefilling"] = engine.status(mid) == "prefilling"
        assert alone.token_ids
        result["alone_s"] = alone_s
        result["ratio"] = result["contended_s"] / alone_s
        return result


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    n = plan["tokens"]
    all_prompts = anyio.run(_prompts, ctx, max(plan["ns"]))
    rows = []
    for n_seq in plan["ns"]:
        prompts = all_prompts[:n_seq]
        loop = RawLoop(ctx.model_path, ctx.threads, n_seq=n_seq, n_ctx=N_CTX)
        runs: dict[str, list[dict[str, Any]]] = {"loop": [], "asyncio": [], "trio": []}
        try:
            loop.generate(prompts, 4)  # warm-up
            for rep in range(plan["reps"]):
                runs["asyncio"].append(anyio.run(_erllama, ctx, prompts, n))
                ctx.step(f"x{n_seq} asyncio {rep + 1}")
                runs["loop"].append(_loop(loop, prompts, n))
                ctx.step(f"x{n_seq} loop {rep + 1}")
                runs["trio"].append(anyio.run(_erllama, ctx, prompts, n, backend="trio"))
                ctx.step(f"x{n_seq} trio {rep + 1}")
                ctx.step()
        finally:
            loop.close()
        ref = runs["loop"][0]["tokens"]
        same = all(r["tokens"] == ref for k in ("asyncio", "trio") for r in runs[k])
        row: dict[str, Any] = {"streams": n_seq, "tokens_identical_to_loop": same}
        for k, rs in runs.items():
            row[f"{k}_tok_per_s"] = median([r["tok_per_s"] for r in rs if r["tok_per_s"]])
        row["max_running"] = min(r["max_running"] for k in ("asyncio", "trio") for r in runs[k])
        for k in ("asyncio", "trio"):
            row[f"{k}_vs_loop"] = row[f"{k}_tok_per_s"] / row["loop_tok_per_s"]
        rows.append(row)
    one = next(r for r in rows if r["streams"] == 1)
    for row in rows:
        for k in ("loop", "asyncio", "trio"):
            row[f"{k}_vs_one"] = row[f"{k}_tok_per_s"] / one[f"{k}_tok_per_s"]

    async def prompts_for_contention() -> tuple[list[int], list[int]]:
        async with erllama.open_engine(erllama.EngineConfig(cache=cache_config(None))) as e:
            mid = await e.load_model(
                "m", model_config(ctx.model_path, threads=ctx.threads, n_ctx=LONG_CTX)
            )
            long = await prompt_of_length(e, mid, plan["long"], "contention")
            short = await e.apply_chat_template(
                mid, [{"role": "user", "content": "Name three rivers in Europe, please."}]
            )
            return long, short

    long, short = anyio.run(prompts_for_contention)
    contention = []
    for chunk in (None, N_BATCH):
        reps = [
            anyio.run(_contended, ctx, long, short, chunk) for _ in range(plan["contention_reps"])
        ]
        ctx.step(f"contention chunk={chunk}")
        contention.append(
            {
                "prefill_chunk": "default (128)" if chunk is None else str(chunk),
                "alone_ttft_s": median([r["alone_s"] for r in reps]),
                "contended_ttft_s": median([r["contended_s"] for r in reps]),
                "ratio": median([r["ratio"] for r in reps]),
                "long_request_s": median([r["long_s"] for r in reps]),
                "long_still_prefilling": all(r["long_still_prefilling"] for r in reps),
            }
        )
        ctx.step()
    return {
        "tokens_per_stream": n,
        "reps": plan["reps"],
        "n_ctx_per_sequence": N_CTX,
        "rows": rows,
        "short_prompt_tokens": len(short),
        "long_prompt_tokens": len(long),
        "contention": contention,
        "method": {
            "aggregate": "tokens after every stream's first token / (last token - that moment)",
            "loop": "bench/rawloop.py: all N sequences in one llama_decode per step",
            "erllama": "engine.infer x N at once, cache off, n_seq_max = N; median of reps",
            "contention": "short request submitted 1 s into the long prompt's prefill",
        },
    }


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    worst = min(min(r["asyncio_vs_loop"], r["trio_vs_loop"]) for r in result["rows"])
    parts = ", ".join(
        f"x{r['streams']}: {min(r['asyncio_vs_loop'], r['trio_vs_loop']):.1%}"
        for r in result["rows"]
    )
    default = result["contention"][0]
    return [
        {
            "figure": "aggregate decode, erllama vs plain batched loop (worst loop), by streams",
            "value": worst,
            "display": parts,
            "target": ">= 95% at every N",
            "met": worst >= 0.95,
        },
        {
            "figure": f"TTFT of a short request during a {result['long_prompt_tokens']}-token "
            "prefill vs alone",
            "value": default["ratio"],
            "display": f"{default['contended_ttft_s'] * 1e3:.0f} ms vs "
            f"{default['alone_ttft_s'] * 1e3:.0f} ms alone ({default['ratio']:.1f}x); chunk = "
            f"n_batch: {result['contention'][1]['contended_ttft_s'] * 1e3:.0f} ms",
            "target": None,
            "met": None,
        },
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['tokens_per_stream']} greedy tokens per stream, n_ctx {result['n_ctx_per_sequence']} "
        f"per sequence, median of {result['reps']}.",
        "",
        "| streams | plain loop tok/s | erllama asyncio | vs loop | erllama trio | vs loop "
        "| loop vs 1 stream | erllama vs 1 stream | tokens identical | ran together |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['streams']} | {r['loop_tok_per_s']:.1f} | {r['asyncio_tok_per_s']:.1f} | "
            f"{r['asyncio_vs_loop']:.1%} | {r['trio_tok_per_s']:.1f} | {r['trio_vs_loop']:.1%} | "
            f"{r['loop_vs_one']:.2f}x | {r['asyncio_vs_one']:.2f}x | "
            f"{r['tokens_identical_to_loop']} | {r['max_running']} |"
        )
    lines += [
        "",
        f"A short request ({result['short_prompt_tokens']} tokens) arriving 1 s into the prefill "
        f"of a {result['long_prompt_tokens']}-token prompt (n_seq_max 2):",
        "",
        "| prefill chunk | TTFT alone | TTFT during the long prefill | ratio | long request total |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in result["contention"]:
        lines.append(
            f"| {c['prefill_chunk']} | {c['alone_ttft_s'] * 1e3:.0f} ms | "
            f"{c['contended_ttft_s'] * 1e3:.0f} ms | {c['ratio']:.1f}x | {c['long_request_s']:.1f} s |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ns = [r["streams"] for r in result["rows"]]
    for key, label in (
        ("loop", "plain batched loop"),
        ("asyncio", "erllama asyncio"),
        ("trio", "erllama trio"),
    ):
        ax.plot(ns, [r[f"{key}_tok_per_s"] for r in result["rows"]], "-o", label=label)
    ax.set_xlabel("concurrent streams (n_seq_max)")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_title("Batched decode")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return {"streams": fig}
