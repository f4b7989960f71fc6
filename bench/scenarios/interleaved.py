"""Scenario 3: interleaved conversations, erllama against llama-cpp-python's own caches.

Four conversations take turns (A, B, C, D, A, B, ...) for three rounds. Every turn resends the
whole conversation through the chat template, as OpenAI-style clients do: the history, each
earlier reply as the text the model produced, and a new question; the reply is capped at
``max_tokens``. Two variants:

- ``own_history``: each conversation starts with its own ~700-token history (a one-line
  system prompt and earlier user/assistant exchanges);
- ``shared_system``: the four share one ~700-token system prompt and start empty.

erllama runs the conversations live (RAM tier + disk tier). Turn by turn, the exact token
list erllama was sent also goes, right after it, through every other system, so all of them
see the same prompts and the same machine conditions:

- ``erllama_no_cache``: erllama with the cache off;
- ``llama_cpp_ram_cache``: one ``llama_cpp.Llama`` with ``LlamaRAMCache`` (1 GiB);
- ``llama_cpp_disk_cache``: one ``Llama`` with ``LlamaDiskCache``;
- ``llama_cpp_no_cache``: one ``Llama`` with no cache (it still reuses its live context's
  common prefix, which interleaving defeats).

Then erllama and the ``LlamaDiskCache`` peer are restarted on their folders and replay the
same turns in the same order: ``erllama_restarted`` (warm from disk: the RAM rows were
spilled to the disk tier when the first engine closed) and
``llama_cpp_disk_cache_restarted``.

See bench/peers.py for what the peer does differently. Every system gets one small warm-up
request first.
"""

from __future__ import annotations

from typing import Any

import anyio
from common import GIB, cache_config, median, model_config, prose_of_tokens, question, timed
from peers import LlamaPeer

import erllama

NAME = "interleaved"
TITLE = "Interleaved conversations: erllama vs llama-cpp-python's caches"
MAX_TOKENS = 24
SYSTEMS = (
    "erllama",
    "erllama_restarted",
    "llama_cpp_ram_cache",
    "llama_cpp_disk_cache",
    "llama_cpp_disk_cache_restarted",
    "llama_cpp_no_cache",
    "erllama_no_cache",
)
LABELS = {
    "erllama": "erllama (RAM + disk tiers)",
    "erllama_restarted": "erllama after restart (warm from disk)",
    "llama_cpp_ram_cache": "llama_cpp.Llama + LlamaRAMCache",
    "llama_cpp_disk_cache": "llama_cpp.Llama + LlamaDiskCache",
    "llama_cpp_disk_cache_restarted": "llama_cpp.Llama + LlamaDiskCache after restart",
    "llama_cpp_no_cache": "llama_cpp.Llama, no cache",
    "erllama_no_cache": "erllama, cache off",
}


PEER_NOTES = [
    "llama_cpp.Llama holds one sequence: a turn of another conversation replaces its live "
    "context, so only a cache can bring a conversation back.",
    "LlamaRAMCache and LlamaDiskCache restore a whole llama state plus a copy of the logits "
    "buffer (up to n_batch x n_vocab floats: 100 MB here) and save a new full state after every "
    "completion, inside the request.",
    "LlamaDiskCache removes the entry it matched on every lookup (diskcache pop), even when "
    "the match is only the chat template's first few tokens and the state is not used; in "
    "interleaved conversations each new turn therefore deletes another conversation's "
    "entry (see the tokens-reused column).",
]


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {
            "conversations": 2,
            "rounds": 2,
            "history_tokens": 150,
            "variants": ("own_history", "shared_system"),
        }
    return {
        "conversations": 4,
        "rounds": 3,
        "history_tokens": 700,
        "variants": ("own_history", "shared_system"),
    }


def steps(ctx: Any) -> int:
    plan = _plan(ctx)
    return len(plan["variants"]) * plan["conversations"] * plan["rounds"] * 2


async def _openings(
    engine: erllama.Engine, mid: str, variant: str, plan: dict[str, Any]
) -> list[tuple[str | None, list[dict[str, str]]]]:
    """Each conversation's (system prompt, messages) before its first turn."""
    n, target = plan["conversations"], plan["history_tokens"]
    if variant == "shared_system":
        system = await prose_of_tokens(engine, mid, target, seed="interleaved-shared-system")
        return [(system, []) for _ in range(n)]
    out: list[tuple[str | None, list[dict[str, str]]]] = []
    for c in range(n):
        system = f"You are archivist number {c + 1} of a county records office. Answer briefly."
        messages: list[dict[str, str]] = []
        k = 0
        while len(await engine.apply_chat_template(mid, messages, system=system)) < target:
            messages.append(
                {
                    "role": "user",
                    "content": "Here are some notes:\n"
                    + await prose_of_tokens(engine, mid, 70, seed=f"hist-{c}-u{k}")
                    + "\nPlease keep them in mind.",
                }
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": "Noted. "
                    + await prose_of_tokens(engine, mid, 40, seed=f"hist-{c}-a{k}"),
                }
            )
            k += 1
        out.append((system, messages))
    return out


def _turn(
    conv: int, rnd: int, prompt_tokens: int, ttft: float, total: float, **kw: Any
) -> dict[str, Any]:
    return {
        "conversation": "ABCDEFGH"[conv],
        "round": rnd + 1,
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft,
        "total_s": total,
        **kw,
    }


def _record(t: Any) -> dict[str, Any]:
    return {
        "hit": t.hit_kind,
        "restored": t.stats.cache_delta.read,
        "tier": t.hit.tier if t.hit else None,
    }


def _peer_row(
    c: int, rnd: int, prompt: list[int], r: dict[str, Any], reused: int, kind: str | None
) -> dict[str, Any]:
    hit = "cold" if reused == 0 else "partial"
    return _turn(
        c, rnd, len(prompt), r["ttft_s"], r["total_s"], hit=hit, restored=reused, tier=kind
    )


async def _peer_turn(peer: LlamaPeer, prompt: list[int]) -> tuple[dict[str, Any], int]:
    def turn() -> tuple[dict[str, Any], int]:
        reused = peer.reuse(prompt)  # outside the timing
        return peer.complete(prompt, max_tokens=MAX_TOKENS), reused

    return await anyio.to_thread.run_sync(turn)


async def _variant(ctx: Any, variant: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 runs every system turn by turn (erllama live first, then the others on the
    same prompt), so machine drift hits all systems alike; phase 2 restarts erllama and
    the LlamaDiskCache peer on their folders and replays the same turns."""
    disk = ctx.fresh_dir("disk")
    peer_disk = ctx.fresh_dir("disk")
    mc = model_config(ctx.model_path, threads=ctx.threads)
    persistent = erllama.CacheConfig(ram_bytes=GIB, ram_file_dir=None, disk_dir=disk)
    turns: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    script: list[tuple[int, int, list[int]]] = []
    off_cfg = erllama.EngineConfig(cache=cache_config(None))
    async with (
        erllama.open_engine(erllama.EngineConfig(cache=persistent)) as live,
        erllama.open_engine(off_cfg) as off,
    ):
        m_live = await live.load_model("m", mc)
        # erllama "cache off" means no reuse at all: live KV reuse off too.
        m_off = await off.load_model(
            "m", model_config(ctx.model_path, threads=ctx.threads, live=False)
        )
        for e, m in ((live, m_live), (off, m_off)):
            await timed(e, m, "Warm-up.", max_tokens=2)
        peers: dict[str, LlamaPeer] = {}
        try:
            for name, kind, folder in (
                ("llama_cpp_ram_cache", "ram", None),
                ("llama_cpp_disk_cache", "disk", peer_disk),
                ("llama_cpp_no_cache", None, None),
            ):
                peers[name] = await anyio.to_thread.run_sync(
                    lambda k=kind, f=folder: LlamaPeer(
                        ctx.model_path, threads=ctx.threads, cache=k, cache_dir=f
                    )
                )
            convs = await _openings(live, m_live, variant, plan)
            opening = [
                len(await live.apply_chat_template(m_live, msgs, system=system))
                for system, msgs in convs
            ]
            history = [list(msgs) for _, msgs in convs]
            for rnd in range(plan["rounds"]):
                for c, (system, _) in enumerate(convs):
                    history[c].append({"role": "user", "content": question(f"{variant}-{c}-{rnd}")})
                    prompt = await live.apply_chat_template(m_live, history[c], system=system)
                    script.append((c, rnd, prompt))
                    t = await timed(live, m_live, prompt, max_tokens=MAX_TOKENS)
                    # The reply goes back as text, as an OpenAI-style client resends it.
                    history[c].append({"role": "assistant", "content": t.text})
                    turns["erllama"].append(
                        _turn(c, rnd, len(prompt), t.ttft_s, t.total_s, **_record(t))
                    )
                    t = await timed(off, m_off, prompt, max_tokens=MAX_TOKENS)
                    turns["erllama_no_cache"].append(
                        _turn(c, rnd, len(prompt), t.ttft_s, t.total_s, **_record(t))
                    )
                    for name, peer in peers.items():
                        r, reused = await _peer_turn(peer, prompt)
                        turns[name].append(_peer_row(c, rnd, prompt, r, reused, peer.kind))
                    ctx.step(f"{variant} {'ABCDEFGH'[c]}{rnd + 1}")
        finally:
            for peer in peers.values():
                peer.close()
        counters = live.cache_counters()
    # Phase 2: both restarted on their own folders (erllama spilled its RAM rows to disk
    # when it closed), the same turns replayed in the same order.
    async with erllama.open_engine(erllama.EngineConfig(cache=persistent)) as again:
        m_again = await again.load_model("m", mc)
        await timed(again, m_again, "Warm-up.", max_tokens=2)
        peer = await anyio.to_thread.run_sync(
            lambda: LlamaPeer(
                ctx.model_path, threads=ctx.threads, cache="disk", cache_dir=peer_disk
            )
        )
        try:
            for c, rnd, prompt in script:
                t = await timed(again, m_again, prompt, max_tokens=MAX_TOKENS)
                turns["erllama_restarted"].append(
                    _turn(c, rnd, len(prompt), t.ttft_s, t.total_s, **_record(t))
                )
                r, reused = await _peer_turn(peer, prompt)
                turns["llama_cpp_disk_cache_restarted"].append(
                    _peer_row(c, rnd, prompt, r, reused, "disk")
                )
                ctx.step(f"{variant} restarted {'ABCDEFGH'[c]}{rnd + 1}")
        finally:
            peer.close()
    systems = {name: _summarise(turns[name]) for name in SYSTEMS}
    base = systems["erllama"]
    for s in systems.values():
        s["ttft_sum_vs_erllama"] = s["ttft_sum_s"] / base["ttft_sum_s"]
        if s["ttft_median_round2plus_s"] and base["ttft_median_round2plus_s"]:
            s["ttft_median_round2plus_vs_erllama"] = (
                s["ttft_median_round2plus_s"] / base["ttft_median_round2plus_s"]
            )
    return {
        "conversations": plan["conversations"],
        "rounds": plan["rounds"],
        "max_tokens": MAX_TOKENS,
        "opening_tokens": opening,
        "erllama_cache_counters": {
            k: getattr(counters, k)
            for k in ("hits_exact", "hits_longest_prefix", "misses", "saves", "spills")
        },
        "systems": systems,
    }


def _summarise(turns: list[dict[str, Any]]) -> dict[str, Any]:
    later = [t["ttft_s"] for t in turns if t["round"] > 1]
    return {
        "ttft_sum_s": sum(t["ttft_s"] for t in turns),
        "ttft_median_s": median([t["ttft_s"] for t in turns]),
        "ttft_median_round2plus_s": median(later) if later else None,
        "wall_s": sum(t["total_s"] for t in turns),
        "turns": turns,
    }


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    out: dict[str, Any] = {
        "variants": {v: anyio.run(_variant, ctx, v, plan) for v in plan["variants"]}
    }
    out["method"] = {
        "ttft": "client side, request sent -> first token (erllama Token event, Llama stream chunk)",
        "order": "turn by turn: erllama live, erllama cache off, LlamaRAMCache, LlamaDiskCache, "
        "no cache, all on the prompt erllama's live conversation produced; then erllama and "
        "LlamaDiskCache restarted, replaying the same turns in the same order",
        "single_runs": "each system runs the turn sequence once (a full run takes minutes)",
        "restored": "erllama: tokens read from the cache; llama_cpp: tokens not re-evaluated "
        "(live context or cache entry prefix), computed outside the timing",
        "labels": LABELS,
        "peer_notes": PEER_NOTES,
    }
    return out


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for variant, v in result["variants"].items():
        s = v["systems"]
        e = s["erllama"]
        peers = ", ".join(
            f"{short} {s[name]['ttft_sum_s']:.1f} s ({s[name]['ttft_sum_vs_erllama']:.1f}x)"
            for name, short in (
                ("llama_cpp_ram_cache", "LlamaRAMCache"),
                ("llama_cpp_disk_cache", "LlamaDiskCache"),
                ("llama_cpp_no_cache", "no cache"),
            )
        )
        n = len(e["turns"])
        out.append(
            {
                "figure": f"interleaved {variant}: sum of TTFT over {n} turns",
                "value": e["ttft_sum_s"],
                "display": f"erllama {e['ttft_sum_s']:.1f} s; {peers}",
                "target": None,
                "met": None,
            }
        )
        r, d = s["erllama_restarted"], s["llama_cpp_disk_cache_restarted"]
        out.append(
            {
                "figure": f"interleaved {variant}: after restart, sum of TTFT",
                "value": r["ttft_sum_s"],
                "display": f"erllama {r['ttft_sum_s']:.1f} s (median {r['ttft_median_s'] * 1e3:.0f} ms);"
                f" LlamaDiskCache {d['ttft_sum_s']:.1f} s ({d['ttft_sum_s'] / r['ttft_sum_s']:.1f}x)",
                "target": None,
                "met": None,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for variant, v in result["variants"].items():
        s = v["systems"]
        lines += [
            f"**{variant}**: {v['conversations']} conversations x {v['rounds']} rounds, openings "
            f"of {v['opening_tokens']} tokens, replies capped at {v['max_tokens']} tokens; "
            "one run each.",
            "",
            "| system | TTFT sum | vs erllama | median TTFT | median TTFT, rounds 2+ | "
            "wall (all turns) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in SYSTEMS:
            x = s[name]
            r2 = x["ttft_median_round2plus_s"]
            lines.append(
                f"| {LABELS[name]} | {x['ttft_sum_s']:.2f} s | {x['ttft_sum_vs_erllama']:.2f}x | "
                f"{x['ttft_median_s'] * 1e3:.0f} ms | "
                f"{'' if r2 is None else f'{r2 * 1e3:.0f} ms'} | {x['wall_s']:.2f} s |"
            )
        lines += [
            "",
            "Per turn: TTFT in ms (prompt tokens not recomputed: restored from a cache, or "
            "reused from the live context).",
            "",
        ]
        head = "| turn | prompt | " + " | ".join(LABELS[n] for n in SYSTEMS) + " |"
        lines += [head, "|---|---:|" + "---:|" * len(SYSTEMS)]
        for i, t in enumerate(s["erllama"]["turns"]):
            cells = []
            for name in SYSTEMS:
                tt = s[name]["turns"][i]
                cells.append(f"{tt['ttft_s'] * 1e3:.0f} ({tt['restored']})")
            lines.append(
                f"| {t['conversation']}{t['round']} | {t['prompt_tokens']} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    lines += ["About the peers:", ""] + [f"- {n}" for n in result["method"]["peer_notes"]]
    return "\n".join(lines).rstrip()


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    variants = list(result["variants"])
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4.4), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        s = result["variants"][variant]["systems"]
        for name in SYSTEMS:
            turns = s[name]["turns"]
            ax.plot(
                range(1, len(turns) + 1),
                [t["ttft_s"] * 1e3 for t in turns],
                "-o" if name.startswith("erllama") else "--.",
                label=LABELS[name],
                markersize=4,
            )
        labels = [f"{t['conversation']}{t['round']}" for t in s["erllama"]["turns"]]
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time to first token (ms, log)")
        ax.set_xlabel("turn (conversation, round)")
        ax.set_title(f"Interleaved conversations: {variant}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    return {"interleaved": fig}
