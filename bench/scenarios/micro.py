"""Scenario 5: stub micro-benchmarks (no model weights).

- **Engine overhead per token**: the ``stub`` backend with no step delay generates tokens as
  fast as the engine can ask for them (cache off), on asyncio and on trio, with one stream
  and with eight concurrent streams (``n_seq_max=8``, one step serves all eight). Reported as
  token events per second and microseconds per token, beside the stub's own cost per step
  (the same ``step`` + ``detokenize`` calls made in a bare loop), so the difference is
  what the engine adds: tick scheduling, the thread hop, events and the stream.
- **Longest-prefix lookup**: ``PrefixIndex.longest`` by number of rows (10 to 10,000) and
  prompt length (up to 32,000 tokens), reusing bench/bench_prefix_index.py's workloads
  (``mixed``: 64 conversations sharing a 1k system prompt, rows at random lengths;
  ``nested``: every row a prefix of the prompt). Also the whole miss path of a lookup as
  the cache runs it: encode the token list, hash the key, walk the index.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import bench_prefix_index as bpi
from common import cache_config

import erllama
from erllama.backends import stub
from erllama.backends.types import Decode, Prefill
from erllama.cache.key import Namespace, encode_tokens

NAME = "micro"
TITLE = "Stub micro-benchmarks: engine cost per token, prefix lookup"
PLOTS = ("prefix_lookup",)
PROMPT = "kabo rite sanu " * 8


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {
            "tokens": 2000,
            "rows": (10, 10_000),
            "prompts": (1000, 32_000),
            "workloads": ("mixed",),
            "budget_s": 0.05,
        }
    return {
        "tokens": 20_000,
        "rows": (10, 100, 1000, 10_000),
        "prompts": (1000, 8000, 32_000),
        "workloads": ("mixed", "nested"),
        "budget_s": 0.2,
    }


def steps(ctx: Any) -> int:
    plan = _plan(ctx)
    return 4 + 1 + len(plan["workloads"]) * len(plan["rows"])


async def _events(n_tokens: int, streams: int) -> dict[str, Any]:
    config = erllama.EngineConfig(cache=cache_config(None))
    n_ctx = n_tokens + 256
    mc = erllama.ModelConfig(backend="stub", n_ctx=n_ctx, n_seq_max=streams)
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("stub", mc)
        await engine.complete(mid, PROMPT, max_tokens=16)
        counts = [0] * streams

        async def one(i: int) -> None:
            stream = await engine.infer(mid, PROMPT, max_tokens=n_tokens // streams, seed=i)
            async with stream:
                async for ev in stream:
                    if isinstance(ev, erllama.Token):
                        counts[i] += 1

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)
        elapsed = time.perf_counter() - t0
    total = sum(counts)
    return {
        "streams": streams,
        "tokens": total,
        "seconds": elapsed,
        "events_per_s": total / elapsed,
        "us_per_token": elapsed / total * 1e6,
    }


def _stub_alone(n_tokens: int) -> float:
    """Microseconds per token of the stub's own step + detokenize, in a bare loop."""
    cfg = erllama.ModelConfig(backend="stub", n_ctx=n_tokens + 256)
    model = stub.load(cfg).handle
    prompt = stub.tokenize(model, PROMPT, True, False)
    stub.step(model, [Prefill(seq=0, tokens=tuple(prompt), logits=True)], None)
    ops = [Decode(seq=0, sampler=None)]
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        (res,) = stub.step(model, ops, None)
        stub.detokenize(model, [res.token])  # type: ignore[union-attr]
    return (time.perf_counter() - t0) / n_tokens * 1e6


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    n = plan["tokens"]
    events = []
    for backend in ("asyncio", "trio"):
        for streams in (1, 8):
            r = anyio.run(_events, n, streams, backend=backend)
            r["backend"] = backend
            events.append(r)
            ctx.step(f"stub {backend} x{streams}")
    stub_us = min(_stub_alone(n) for _ in range(3))
    for r in events:
        r["engine_us_per_token"] = r["us_per_token"] - stub_us
    ctx.step("stub alone")

    rng = random.Random(0)
    convs = bpi.conversations(rng)
    ns = Namespace(b"\x01" * 32, 1, b"\x02" * 32)
    lookups = []
    for workload in plan["workloads"]:
        for n_rows in plan["rows"]:
            index = bpi.build(n_rows, workload == "nested", convs, rng)
            for n_tok in plan["prompts"]:
                prompt = [*convs[0][: n_tok - 1], 7]  # continues past every saved prefix

                def full(ix: Any = index, p: list[int] = prompt) -> object:
                    tb = encode_tokens(p)
                    ns.key_of_bytes(tb)
                    return ix.longest(bpi.NS, tb, max_len=len(p))

                tb = encode_tokens(prompt)
                lookups.append(
                    {
                        "workload": workload,
                        "rows": n_rows,
                        "prompt_tokens": n_tok,
                        "prefix_rows_found": len(index.longest(bpi.NS, tb)),
                        "walk_us": bpi.best_us(
                            lambda ix=index, b=tb: ix.longest(bpi.NS, b), plan["budget_s"]
                        ),
                        "full_lookup_us": bpi.best_us(full, plan["budget_s"]),
                    }
                )
            ctx.step(f"lookup {workload} {n_rows}")
    return {
        "stub_tokens": n,
        "stub_step_us_per_token": stub_us,
        "events": events,
        "lookups": lookups,
        "method": {
            "events": "stub backend, no step delay, cache off; wall time over all tokens",
            "engine_us_per_token": "engine us/token minus the stub's own step+detokenize cost",
            "walk_us": "PrefixIndex.longest on the prompt's u32 bytes, best of repeated runs",
            "full_lookup_us": "encode_tokens(list) + SHA-256 key + walk: a miss before any read",
        },
    }


def _lookup(result: dict[str, Any], rows: int, tokens: int) -> dict[str, Any] | None:
    return next(
        (
            x
            for x in result["lookups"]
            if x["rows"] == rows and x["prompt_tokens"] == tokens and x["workload"] == "mixed"
        ),
        None,
    )


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    big = _lookup(result, 10_000, 32_000)
    if big is not None:
        out.append(
            {
                "figure": "longest-prefix lookup, 32,000-token prompt, 10,000 rows",
                "value": big["walk_us"] / 1e3,
                "display": f"{big['walk_us'] / 1e3:.3f} ms index walk "
                f"({big['full_lookup_us'] / 1e3:.3f} ms with encode + key hash)",
                "target": "< 1 ms",
                "met": big["walk_us"] < 1000,
            }
        )
    one = {(e["backend"], e["streams"]): e for e in result["events"]}
    for streams, target in ((1, 20.0), (8, 10.0)):
        worst = max(one[(b, streams)]["engine_us_per_token"] for b in ("asyncio", "trio"))
        out.append(
            {
                "figure": f"engine cost per token, zero-cost stub step, {streams} stream(s)",
                "value": worst,
                "display": f"asyncio {one[('asyncio', streams)]['engine_us_per_token']:.1f} µs "
                f"({one[('asyncio', streams)]['events_per_s']:,.0f} tokens/s), trio "
                f"{one[('trio', streams)]['engine_us_per_token']:.1f} µs "
                f"({one[('trio', streams)]['events_per_s']:,.0f} tokens/s)",
                "target": f"<= {target:.0f} µs",
                "met": worst <= target,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Stub alone: {result['stub_step_us_per_token']:.1f} µs per token (step + detokenize).",
        "",
        "| backend | streams | tokens | events/s | µs/token | engine µs/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in result["events"]:
        lines.append(
            f"| {e['backend']} | {e['streams']} | {e['tokens']} | {e['events_per_s']:,.0f} | "
            f"{e['us_per_token']:.1f} | {e['engine_us_per_token']:.1f} |"
        )
    lines += [
        "",
        "| workload | rows | prompt tokens | rows found | index walk | encode + key + walk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for x in result["lookups"]:
        lines.append(
            f"| {x['workload']} | {x['rows']} | {x['prompt_tokens']} | {x['prefix_rows_found']} "
            f"| {x['walk_us']:.1f} µs | {x['full_lookup_us']:.1f} µs |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for workload in sorted({x["workload"] for x in result["lookups"]}):
        for n_tok in sorted({x["prompt_tokens"] for x in result["lookups"]}):
            pts = [
                x
                for x in result["lookups"]
                if x["workload"] == workload and x["prompt_tokens"] == n_tok
            ]
            ax.plot(
                [x["rows"] for x in pts],
                [x["walk_us"] for x in pts],
                "-o" if workload == "mixed" else "--x",
                label=f"{workload}, {n_tok} tokens",
            )
    ax.axhline(1000, color="red", lw=0.8, ls=":", label="1 ms target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in the index")
    ax.set_ylabel("longest-prefix lookup (µs, log)")
    ax.set_title("Prefix index lookup")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return {"prefix_lookup": fig}
