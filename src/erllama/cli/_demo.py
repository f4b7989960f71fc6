"""``erllama demo``: the same chat on an engine with the KV cache and on one without."""

from __future__ import annotations

import argparse

from ..config import CacheConfig, EngineConfig
from ..engine import Engine, open_engine
from ._commands import NO_CACHE
from ._common import load, ms, stream_reply
from ._console import Console

__all__ = ["DEMO_TURNS", "demo"]

DEMO_SYSTEM = (
    "You are a meticulous assistant for a small bookshop. You answer questions about the "
    "shop, its stock and its policies. The shop opens at nine and closes at six, Monday to "
    "Saturday. It sells new and second-hand books, stocks poetry, history, science and "
    "children's books, and orders any book in print within three days. Customers may return "
    "a book within thirty days with a receipt. The shop runs a reading group on the first "
    "Thursday of each month and a story hour for children every Saturday at ten. "
) * 4
DEMO_TURNS = [
    "When does the shop open on Saturdays?",
    "Can I return a book I bought last week?",
    "What happens on the first Thursday of the month?",
    "Do you have anything for children?",
]


def _tier(engine: Engine, mid: str) -> str:
    hit = engine.model_info(mid).last_cache_hit
    return f" from {hit.tier}" if hit is not None and hit.tier else ""


async def demo(args: argparse.Namespace, console: Console) -> int:
    console.note(f"model: {args.model.name}")
    # The warm engine keeps its cache in process memory only: the demo leaves no files.
    warm_cfg = EngineConfig(cache=CacheConfig(ram_file_dir=None))
    rows: list[tuple[int, int, float, float, str, int]] = []
    async with open_engine(NO_CACHE) as cold_engine, open_engine(warm_cfg) as warm_engine:
        cold = await load(cold_engine, args, progress=console.interactive, live=False)
        # The warm model serves warmth from the KV cache alone (live-KV reuse off), so the
        # figures show the cache; a single conversation would also be warm without it.
        warm = await load(warm_engine, args, progress=False, live=False)
        history: list[dict[str, str]] = []
        kw = {"max_tokens": args.max_tokens}
        for turn, question in enumerate(DEMO_TURNS[: args.turns], 1):
            history.append({"role": "user", "content": question})
            prompt = await warm_engine.apply_chat_template(warm, history, system=DEMO_SYSTEM)
            console.out.line(f"\nturn {turn}  user> {question}")
            console.out.write("assistant> ")
            reply, done = await stream_reply(warm_engine, warm, prompt, console, **kw)
            st = done.stats
            # The same prompt with no cache at all, for the cold figure.
            cold_res = await cold_engine.complete(cold, prompt, max_tokens=1)
            cold_ttft = cold_res.stats.time_to_first_token_s or 0.0
            warm_ttft = st.time_to_first_token_s or 0.0
            rows.append(
                (turn, len(prompt), cold_ttft, warm_ttft, st.cache_hit_kind, st.cache_delta.read)
            )
            console.out.line(
                f"  [prompt {len(prompt)} tokens | ttft cold {ms(cold_ttft)} -> "
                f"warm {ms(warm_ttft)} | cache {st.cache_hit_kind}{_tier(warm_engine, warm)}, "
                f"{st.cache_delta.read} tokens restored]"
            )
            history.append({"role": "assistant", "content": reply.strip() or "..."})
        counters = warm_engine.cache_counters()
    console.out.line("\nturn  prompt  cold ttft   warm ttft   warm/cold  hit      restored")
    for turn, n, c, w, kind, read in rows:
        ratio = w / c if c else float("nan")
        console.out.line(
            f"{turn:>4}  {n:>6}  {c * 1000:>8.1f}ms {w * 1000:>8.1f}ms  {ratio:>8.1%}  {kind:<8} {read}"
        )
    warm_rows = [r for r in rows if r[4] != "cold"]
    if warm_rows:
        c = sum(r[2] for r in warm_rows)
        w = sum(r[3] for r in warm_rows)
        console.out.line(
            f"\nwarm turns: time to first token {w / c:.1%} of cold ({c / w:.1f}x faster)"
        )
    console.out.line(
        f"cache: {counters.hits} hits ({counters.hits_exact} exact, {counters.hits_resume} "
        f"resume, {counters.hits_longest_prefix} prefix), {counters.misses} misses, "
        f"{counters.saves} saves, {counters.bytes_ram / 1e6:.1f} MB in RAM"
    )
    return 0
