"""Scenario: a conversation's later turns with ``ModelConfig.refeed_replies`` off and on.

One conversation over a ~700-token system prompt, ``TURNS`` turns of ``MAX_TOKENS`` greedy
tokens, a pause of ``PAUSE_S`` between turns (a user reading, an agent running a tool: the
idle time the model feeds the reply again in). Cache off, live KV on: the same sequence
serves every turn. Both settings run in one process, alternating over rounds (each round a
fresh engine and a fresh conversation seed, the same for both). Reported: the median TTFT
of turns 2 on, for each, and the ratio; every answer of the ``on`` run must equal the
``off`` run's (the scenario fails otherwise: the exactness rule promises it).
"""

from __future__ import annotations

from typing import Any

import anyio
from common import median, model_config, prose_of_tokens, timed
from common import question as make_question

import erllama

NAME = "refeed"
TITLE = "Feeding replies again while idle: later-turn TTFT of one conversation, off vs on"
MAX_TOKENS = 48
PAUSE_S = 1.5
SETTINGS = ("off", "on")


def _plan(ctx: Any) -> dict[str, int]:
    return {"rounds": 1 if ctx.quick else 3, "turns": 3 if ctx.quick else 5}


def steps(ctx: Any) -> int:
    plan = _plan(ctx)
    return plan["rounds"] * len(SETTINGS)


async def _conversation(ctx: Any, setting: str, seed: str, turns: int) -> dict[str, Any]:
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(config) as engine:
        mc = model_config(ctx.model_path, threads=ctx.threads, refeed_replies=setting == "on")
        mid = await engine.load_model("m", mc)
        system = await prose_of_tokens(engine, mid, 700, seed=f"refeed-{seed}")
        messages: list[dict[str, str]] = []
        rows = []
        for t in range(turns):
            messages.append({"role": "user", "content": make_question(f"refeed-{seed}-{t}")})
            prompt = await engine.apply_chat_template(mid, messages, system)
            r = await timed(engine, mid, prompt, max_tokens=MAX_TOKENS)
            assert r.reply_text is not None
            rows.append(
                {
                    "turn": t + 1,
                    "ttft_s": r.ttft_s,
                    "restored": r.stats.cache_delta.read,
                    "prompt_tokens": len(prompt),
                    "tokens": r.token_ids,
                }
            )
            messages.append({"role": "assistant", "content": r.reply_text})
            await anyio.sleep(PAUSE_S)
    return {"setting": setting, "turns": rows}


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for r in range(plan["rounds"]):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            runs[setting].append(anyio.run(_conversation, ctx, setting, str(r), plan["turns"]))
            ctx.step(f"{setting}, round {r + 1}")
    for off, on in zip(runs["off"], runs["on"], strict=True):
        for a, b in zip(off["turns"], on["turns"], strict=True):
            if a["tokens"] != b["tokens"]:
                raise RuntimeError(f"turn {a['turn']}: refeed_replies changed the answer")
    out: dict[str, Any] = {
        "rounds": plan["rounds"],
        "turns": plan["turns"],
        "max_tokens": MAX_TOKENS,
        "pause_s": PAUSE_S,
    }
    for setting in SETTINGS:
        later = [t for run in runs[setting] for t in run["turns"] if t["turn"] > 1]
        out[setting] = {
            "ttft_median_later_s": median([t["ttft_s"] for t in later]),
            "restored_share_later": sum(t["restored"] for t in later)
            / sum(t["prompt_tokens"] for t in later),
            "runs": [
                [{k: v for k, v in t.items() if k != "tokens"} for t in run["turns"]]
                for run in runs[setting]
            ],
        }
    out["on_vs_off"] = out["on"]["ttft_median_later_s"] / out["off"]["ttft_median_later_s"]
    return out


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    off, on = result["off"], result["on"]
    return [
        {
            "figure": "one conversation, later turns after a pause, refeed_replies on vs off: "
            "median TTFT",
            "value": result["on_vs_off"],
            "display": f"{on['ttft_median_later_s'] * 1e3:.0f} ms vs "
            f"{off['ttft_median_later_s'] * 1e3:.0f} ms ({result['on_vs_off']:.2f}x); "
            f"restored {on['restored_share_later']:.0%} vs {off['restored_share_later']:.0%} "
            "of the prompts; identical answers",
            "target": None,
            "met": None,
        }
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"One conversation, {result['turns']} turns of {result['max_tokens']} greedy tokens, "
        f"{result['pause_s']} s between turns, cache off (live KV), {result['rounds']} rounds.",
        "",
        "| refeed_replies | median TTFT, turns 2+ | prompt tokens restored, turns 2+ |",
        "|---|---:|---:|",
    ]
    for setting in SETTINGS:
        s = result[setting]
        lines.append(
            f"| {setting} | {s['ttft_median_later_s'] * 1e3:.0f} ms | "
            f"{s['restored_share_later']:.0%} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}
