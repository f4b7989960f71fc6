"""Q5 (exact hits): the cost of re-feeding the last grid cell instead of one token.

For prompt lengths n in --lens: restore the prompt's own state, seq_rm, re-feed
  x1   the last token alone (erllama today)
  xG   the last (n-1) % G + 1 tokens, i.e. the prompt's last grid cell (G in --grids)
Timed: seq_rm + re-feed (the restore itself is the same for both and is not timed).
Alternating, several rounds; medians in ms.

usage: exp5b_exact.py [--lens 300,1000,2000] [--grids 64,128,256] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import Ctx, QUESTIONS, chat, grid, log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="300,1000,2000")
    ap.add_argument("--grids", default="64,128,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ctx = Ctx(threads=a.threads)
    text = "".join(chat(q) for q in QUESTIONS * 12)
    all_toks = ctx.tokenize(text)
    for n in map(int, a.lens.split(",")):
        toks = all_toks[:n]
        ctx.clear()
        ctx.prefill(0, toks, grid(0, n, 128), logits=True)
        state = ctx.pack(0)
        variants = ["x1"] + [f"x{g}" for g in map(int, a.grids.split(","))]
        times = {v: [] for v in variants}
        for r in range(a.rounds):
            for v in variants[r % len(variants):] + variants[: r % len(variants)]:
                g = 1 if v == "x1" else int(v[1:])
                cut = n - 1 if g == 1 else (n - 1) // g * g
                ctx.clear()
                ctx.unpack(0, state)
                t0 = time.perf_counter()
                ctx.rm(0, cut)
                ctx.prefill(0, toks[cut:], [])
                times[v].append(time.perf_counter() - t0)
        log(f"n={n}: " + "  ".join(
            f"{v} ({n - (n - 1 if v == 'x1' else (n - 1) // int(v[1:]) * int(v[1:]))} tok) "
            f"{1000 * statistics.median(times[v]):.1f} ms" for v in variants))


if __name__ == "__main__":
    main()
