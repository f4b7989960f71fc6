"""Scenario 2: shared-prefix agents.

Four agents share one ~1,000-token system prompt and each asks its own question (chat
template, ``max_tokens`` 16, greedy). All four are submitted at once, as an agent framework
fans out; the model serves one sequence at a time (``n_seq_max=1``), so later agents queue.
Per-agent latency is from submission to the last token; TTFT from submission to the first.

Two rounds, each with new questions and the same system prompt:

- round 1 starts from an empty cache: the first agent prefills the whole prompt and its
  cold save (aligned below the shared prefix) serves the other three;
- round 2 is the steady state: the prefix row is already there for every agent.

The same eight requests run through an engine with the cache switched off, and then through
an engine with the cache on and four sequences (``n_seq_max=4``): the four agents run at
once, and in round 1 the first prefills the shared prefix while the other three wait for it
and copy its cells (in-flight sharing, docs/caching.md), the cold fan-out of issue 22.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
from common import cache_config, model_config, prose_of_tokens, question, timed

import erllama

NAME = "agents"
TITLE = "Shared-prefix agents"
AGENTS = 4
MAX_TOKENS = 16


def _plan(ctx: Any) -> dict[str, int]:
    return {"prefix_tokens": 200 if ctx.quick else 1000, "rounds": 2}


def steps(ctx: Any) -> int:
    return 3 * _plan(ctx)["rounds"]


async def _round(engine: erllama.Engine, mid: str, prompts: list[list[int]]) -> dict[str, Any]:
    results: dict[int, Any] = {}

    async def agent(i: int) -> None:
        results[i] = await timed(engine, mid, prompts[i], max_tokens=MAX_TOKENS)

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(agent, i)
            # Submission order = FIFO order: let agent i enqueue before agent i+1.
            await anyio.lowlevel.checkpoint()
    wall = anyio.current_time() - t0
    agents = [
        {
            "agent": i,
            "prompt_tokens": len(prompts[i]),
            "ttft_s": results[i].ttft_s,
            "latency_s": results[i].total_s,
            "hit": results[i].hit_kind,
            "restored_tokens": results[i].stats.cache_delta.read,
            "completion_tokens": len(results[i].token_ids),
        }
        for i in range(len(prompts))
    ]
    return {"total_s": wall, "agents": agents}


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    mc = model_config(ctx.model_path, threads=ctx.threads)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"with_cache": [], "without_cache": []}
        on_cfg = erllama.EngineConfig(cache=cache_config("ram"))
        off_cfg = erllama.EngineConfig(cache=cache_config(None))
        async with erllama.open_engine(on_cfg) as on, erllama.open_engine(off_cfg) as off:
            m_on = await on.load_model("m", mc)
            # Without the cache means no reuse at all: live KV reuse off too.
            m_off = await off.load_model(
                "m", model_config(ctx.model_path, threads=ctx.threads, live=False)
            )
            for e, m in ((on, m_on), (off, m_off)):
                await timed(e, m, "Warm-up.", max_tokens=2)
            system = await prose_of_tokens(on, m_on, plan["prefix_tokens"], seed="agents-system")
            rounds = []
            for r in range(plan["rounds"]):
                prompts = [
                    await on.apply_chat_template(
                        m_on,
                        [{"role": "user", "content": question(f"agent-{r}-{i}")}],
                        system=system,
                    )
                    for i in range(AGENTS)
                ]
                rounds.append(prompts)
            shared = min(
                next(
                    (k for k, (a, b) in enumerate(zip(p, rounds[0][0], strict=False)) if a != b),
                    len(p),
                )
                for ps in rounds
                for p in ps
            )
            for r, prompts in enumerate(rounds):
                # Alternate which engine goes first so machine drift hits both alike.
                order = (("with_cache", on, m_on), ("without_cache", off, m_off))
                for key, e, m in order if r % 2 == 0 else order[::-1]:
                    res = await _round(e, m, prompts)
                    res["round"] = r + 1
                    out[key].append(res)
                    ctx.step(f"{key} round {r + 1}")
            out["shared_prefix_tokens"] = shared
            out["system_tokens"] = len(await on.tokenize(m_on, system, add_special=False))
            out["_rounds"] = rounds
        return out

    async def fan_out(rounds: list[list[list[int]]]) -> list[dict[str, Any]]:
        config = erllama.EngineConfig(cache=cache_config("ram"))
        async with erllama.open_engine(config) as engine:
            mid = await engine.load_model(
                "m", model_config(ctx.model_path, threads=ctx.threads, n_seq_max=AGENTS)
            )
            await timed(engine, mid, "Warm-up.", max_tokens=2)
            out = []
            for r, prompts in enumerate(rounds):
                res = await _round(engine, mid, prompts)
                res["round"] = r + 1
                out.append(res)
                ctx.step(f"fan_out round {r + 1}")
            return out

    result: dict[str, Any] = anyio.run(main)
    result["fan_out"] = anyio.run(fan_out, result.pop("_rounds"))
    for r in range(len(result["with_cache"])):
        on_r, off_r = result["with_cache"][r], result["without_cache"][r]
        on_r["speedup_total"] = off_r["total_s"] / on_r["total_s"]
        on_r["mean_latency_s"] = sum(a["latency_s"] for a in on_r["agents"]) / AGENTS
        off_r["mean_latency_s"] = sum(a["latency_s"] for a in off_r["agents"]) / AGENTS
        fan_r = result["fan_out"][r]
        fan_r["mean_latency_s"] = sum(a["latency_s"] for a in fan_r["agents"]) / AGENTS
        fan_r["speedup_total"] = off_r["total_s"] / fan_r["total_s"]
    result["method"] = {
        "agents": AGENTS,
        "max_tokens": MAX_TOKENS,
        "submission": "all agents at once; n_seq_max=1, so they are served in FIFO order "
        "(fan_out: n_seq_max=4, all four at once, in an engine of its own run after the others)",
        "latency": "client side, submission -> last token (includes waiting in the queue)",
        "cache": "RAM tier; round 1 starts empty, round 2 reuses the prefix row",
    }
    return result


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for on_r, off_r in zip(result["with_cache"], result["without_cache"], strict=True):
        r = on_r["round"]
        label = "empty cache" if r == 1 else "prefix cached"
        out.append(
            {
                "figure": f"4 agents, shared prefix, round {r} ({label}): total with vs without cache",
                "value": on_r["speedup_total"],
                "display": f"{on_r['total_s']:.2f} s vs {off_r['total_s']:.2f} s "
                f"({on_r['speedup_total']:.1f}x); mean latency {on_r['mean_latency_s']:.2f} s vs "
                f"{off_r['mean_latency_s']:.2f} s",
                "target": None,
                "met": None,
            }
        )
    for fan_r, off_r in zip(result.get("fan_out", []), result["without_cache"], strict=False):
        r = fan_r["round"]
        label = "empty cache: the prefix prefilled once, in flight" if r == 1 else "prefix cached"
        out.append(
            {
                "figure": f"4 agents at once on 4 sequences, round {r} ({label}): total",
                "value": fan_r["speedup_total"],
                "display": f"{fan_r['total_s']:.2f} s vs {off_r['total_s']:.2f} s one at a time "
                f"without cache ({fan_r['speedup_total']:.1f}x); mean latency "
                f"{fan_r['mean_latency_s']:.2f} s",
                "target": None,
                "met": None,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"System prompt {result['system_tokens']} tokens; the four prompts share their first "
        f"{result['shared_prefix_tokens']} tokens.",
        "",
        "| round | cache | total | mean latency | per agent: latency (TTFT, hit, restored) |",
        "|---:|---|---:|---:|---|",
    ]
    names = {"with_cache": "on", "without_cache": "off", "fan_out": "on, 4 sequences"}
    for key in ("with_cache", "without_cache", "fan_out"):
        for rr in result.get(key, []):
            per = "; ".join(
                f"{a['latency_s']:.2f} s ({a['ttft_s']:.2f} s, {a['hit']}, {a['restored_tokens']})"
                for a in rr["agents"]
            )
            lines.append(
                f"| {rr['round']} | {names[key]} | "
                f"{rr['total_s']:.2f} s | {rr['mean_latency_s']:.2f} s | {per} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    rounds = len(result["with_cache"])
    fig, axes = plt.subplots(1, rounds, figsize=(5.5 * rounds, 4), squeeze=False)
    for r in range(rounds):
        ax = axes[0][r]
        on = result["with_cache"][r]["agents"]
        off = result["without_cache"][r]["agents"]
        xs = range(len(on))
        ax.bar([x - 0.2 for x in xs], [a["latency_s"] for a in off], 0.4, label="cache off")
        ax.bar([x + 0.2 for x in xs], [a["latency_s"] for a in on], 0.4, label="cache on")
        ax.set_xticks(list(xs), [f"agent {x + 1}" for x in xs])
        ax.set_ylabel("latency from submission (s)")
        ax.set_title(f"Round {r + 1}: " + ("empty cache" if r == 0 else "prefix cached"))
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return {"agents": fig}
