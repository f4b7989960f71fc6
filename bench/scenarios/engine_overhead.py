"""Scenario 4: what the engine costs on top of llama.cpp.

Greedy decode of the same chat prompt, the same number of tokens, four ways:

- ``raw``: the plain llama-cpp-python loop of ``rawloop.py`` on the low-level bindings (one
  context with erllama's settings, ``llama_decode`` the prompt, then sample greedily /
  detokenize / decode one token at a time);
- ``erllama_asyncio`` and ``erllama_trio``: ``engine.infer`` with the cache off, streamed;
- ``llama_cpp_llama``: the high-level ``llama_cpp.Llama.create_completion(stream=True)``,
  for reference.

Decode rate = (tokens - 1) / (last token time - first token time), so prefill is excluded;
TTFT is request -> first token. Both hand out a token as soon as it is sampled (erllama
streams it before the forward pass that puts it in the KV). The four run in turn, seven
times, each repetition starting with a different one; rates are medians, and each ratio to
the plain loop is the median of the per-repetition ratios (a shared machine drifts less
within one repetition than across them). Every run is kept. erllama's tokens must equal the raw
loop's: the scenario fails otherwise.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from common import N_CTX, cache_config, median, model_config, on_own_thread, timed
from peers import LlamaPeer
from rawloop import RawLoop

import erllama

NAME = "engine_overhead"
TITLE = "Engine overhead: greedy decode vs a plain llama-cpp-python loop"
SYSTEMS = ("raw", "erllama_asyncio", "erllama_trio", "llama_cpp_llama")
LABELS = {
    "raw": "plain llama-cpp-python loop (low-level)",
    "erllama_asyncio": "erllama on asyncio",
    "erllama_trio": "erllama on trio",
    "llama_cpp_llama": "llama_cpp.Llama (high-level, streaming)",
}
REQUEST = "Write a long, detailed story about a lighthouse keeper and a storm. Use many paragraphs."


def _plan(ctx: Any) -> dict[str, int]:
    return {"reps": 1 if ctx.quick else 7, "tokens": 48 if ctx.quick else 256}


def steps(ctx: Any) -> int:
    return _plan(ctx)["reps"] * len(SYSTEMS)


def _rates(t0: float, stamps: list[float], tokens: list[int]) -> dict[str, Any]:
    span = stamps[-1] - stamps[0]
    return {
        "ttft_s": stamps[0] - t0,
        "decode_tok_per_s": (len(stamps) - 1) / span if span > 0 else None,
        "tokens": len(tokens),
        "token_ids": tokens,
    }


async def _erllama(ctx: Any, prompt: list[int], n: int) -> dict[str, Any]:
    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model(
            "m", model_config(ctx.model_path, threads=ctx.threads, live=False)
        )
        await timed(engine, mid, "Warm-up.", max_tokens=4)
        t = await timed(engine, mid, prompt, max_tokens=n)
    return {
        "ttft_s": t.ttft_s,
        "decode_tok_per_s": t.decode_tok_per_s,
        "tokens": len(t.token_ids),
        "token_ids": t.token_ids,
        "engine_tokens_per_s": t.stats.tokens_per_s,
    }


def _llama(peer: LlamaPeer, prompt: list[int], n: int) -> dict[str, Any]:
    result: dict[str, Any] = on_own_thread(_llama_run, peer, prompt, n)
    return result


def _llama_run(peer: LlamaPeer, prompt: list[int], n: int) -> dict[str, Any]:
    llm = peer.llm
    llm.reset()  # no prefix reuse from the previous repetition
    t0 = time.perf_counter()
    stamps: list[float] = []
    for _ in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
    # The last chunk carries only the finish reason.
    return _rates(t0, stamps[:n], list(range(min(n, len(stamps)))))


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    n = plan["tokens"]

    async def make_prompt() -> list[int]:
        async with erllama.open_engine(erllama.EngineConfig(cache=cache_config(None))) as e:
            mid = await e.load_model(
                "m", model_config(ctx.model_path, threads=ctx.threads, live=False)
            )
            return await e.apply_chat_template(mid, [{"role": "user", "content": REQUEST}])

    prompt = anyio.run(make_prompt)
    raw = RawLoop(ctx.model_path, ctx.threads, n_ctx=N_CTX)
    peer = LlamaPeer(ctx.model_path, threads=ctx.threads, cache=None)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    order = ["erllama_asyncio", "raw", "erllama_trio", "llama_cpp_llama"]
    count = n

    def one(system: str) -> dict[str, Any]:
        if system == "raw":
            r = raw.generate([prompt], count)
            return _rates(r["t0"], r["stamps"], r["tokens"][0])
        if system == "llama_cpp_llama":
            return _llama(peer, prompt, count)
        return anyio.run(_erllama, ctx, prompt, n, backend=system.removeprefix("erllama_"))

    try:
        raw.generate([prompt[:8]], 4)  # warm-up
        for rep in range(plan["reps"]):
            # Each repetition starts with a different system, so none always runs first;
            # the first is erllama, which stops at end of generation: the others then
            # produce the same count.
            for system in order[rep % len(order) :] + order[: rep % len(order)]:
                runs[system].append(one(system))
                if rep == 0 and system == "erllama_asyncio":
                    count = runs[system][0]["tokens"]
                ctx.step(f"{system} {rep + 1}")
    finally:
        raw.close()
        peer.close()
    same = all(
        r["token_ids"] == runs["raw"][0]["token_ids"]
        for s in ("erllama_asyncio", "erllama_trio")
        for r in runs[s]
    )
    if not same:
        raise AssertionError("erllama's greedy tokens differ from the plain loop's")
    summary: dict[str, Any] = {}
    for s in SYSTEMS:
        rates = [r["decode_tok_per_s"] for r in runs[s] if r["decode_tok_per_s"]]
        summary[s] = {
            "decode_tok_per_s": median(rates),
            "ttft_s": median([r["ttft_s"] for r in runs[s]]),
            "tokens": runs[s][0]["tokens"],
            "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs[s]],
        }
    raw_ttft = summary["raw"]["ttft_s"]
    for s in SYSTEMS:
        # Paired: each repetition's rate over the plain loop's in the same repetition, then
        # the median; slow drifts of a shared machine cancel within a pair.
        summary[s]["decode_vs_raw"] = median(
            [
                r["decode_tok_per_s"] / w["decode_tok_per_s"]
                for r, w in zip(runs[s], runs["raw"], strict=True)
            ]
        )
        summary[s]["ttft_vs_raw"] = summary[s]["ttft_s"] / raw_ttft
    return {
        "prompt_tokens": len(prompt),
        "max_tokens": n,
        "reps": plan["reps"],
        "greedy_tokens_identical_to_raw": same,
        "systems": summary,
        "method": {
            "decode_rate": "(tokens - 1) / (last token - first token), client side",
            "ttft": "request -> first token; erllama's includes decoding that token (see doc)",
            "order": "asyncio, raw, trio, Llama in turn, rotated each repetition",
            "vs_raw": "median over repetitions of the rate / the plain loop's in that repetition",
            "cache": "erllama cache off (pure engine path)",
        },
    }


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result["systems"]
    worst = min(s["erllama_asyncio"]["decode_vs_raw"], s["erllama_trio"]["decode_vs_raw"])
    added = max(s[k]["ttft_s"] for k in ("erllama_asyncio", "erllama_trio")) - s["raw"]["ttft_s"]
    return [
        {
            "figure": f"greedy decode tok/s, erllama vs plain loop ({s['raw']['tokens']} tokens,"
            " identical tokens)",
            "value": worst,
            "display": f"asyncio {s['erllama_asyncio']['decode_tok_per_s']:.1f} "
            f"({s['erllama_asyncio']['decode_vs_raw']:.1%}), trio "
            f"{s['erllama_trio']['decode_tok_per_s']:.1f} ({s['erllama_trio']['decode_vs_raw']:.1%})"
            f", raw {s['raw']['decode_tok_per_s']:.1f}, Llama "
            f"{s['llama_cpp_llama']['decode_tok_per_s']:.1f}",
            "target": ">= 97% on both loops",
            "met": worst >= 0.97,
        },
        {
            "figure": f"TTFT added over the plain loop ({result['prompt_tokens']}-token prompt)",
            "value": added,
            "display": f"+{added * 1e3:.1f} ms (asyncio {s['erllama_asyncio']['ttft_s'] * 1e3:.1f} ms,"
            f" trio {s['erllama_trio']['ttft_s'] * 1e3:.1f} ms, raw "
            f"{s['raw']['ttft_s'] * 1e3:.1f} ms, Llama {s['llama_cpp_llama']['ttft_s'] * 1e3:.0f} ms)",
            "target": "<= 2 ms",
            "met": added <= 0.002,
        },
    ]


def markdown(result: dict[str, Any]) -> str:
    s = result["systems"]
    lines = [
        f"Prompt {result['prompt_tokens']} tokens (chat template), {s['raw']['tokens']} tokens "
        f"generated greedily, median of {result['reps']} (ratios paired per repetition); erllama's tokens identical to the "
        f"plain loop's: {result['greedy_tokens_identical_to_raw']}.",
        "",
        "| system | decode tok/s | vs plain loop | TTFT | vs plain loop |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in SYSTEMS:
        x = s[name]
        lines.append(
            f"| {LABELS[name]} | {x['decode_tok_per_s']:.1f} | {x['decode_vs_raw']:.1%} | "
            f"{x['ttft_s'] * 1e3:.0f} ms | {x['ttft_vs_raw']:.2f}x |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    s = result["systems"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(SYSTEMS)
    labels = ["plain loop", "erllama\nasyncio", "erllama\ntrio", "Llama"]
    ax.bar(labels, [s[n]["decode_tok_per_s"] for n in names], color="C0")
    ax.set_ylabel("tokens/s")
    ax.set_title("Greedy decode rate")
    bx.bar(labels, [s[n]["ttft_s"] * 1e3 for n in names], color="C1")
    bx.set_ylabel("ms")
    bx.set_title(f"Time to first token ({result['prompt_tokens']}-token prompt)")
    for a in (ax, bx):
        a.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return {"engine_overhead": fig}
