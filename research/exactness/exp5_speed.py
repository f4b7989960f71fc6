"""Q5: what does grid chunking (or a batch-invariant configuration) cost in prefill speed?

One process; one context per configuration; each round runs every variant once in turn
(rotating the order), prefilling the same prompt cold into sequence 0. Reported: tokens/s (median)
and, per round, time / time of `today` in the same round (the machine is shared: only ratios
from the same round mean anything).

Variants:
  today        n_batch 512, n_ubatch 512, FA auto, chunks of max(64, 512//4) = 128 from 0
               (for a cold prompt the same cuts as a 128 grid)
  gN           grid of N (cuts at multiples of N), otherwise as today
  ubN          n_ubatch N (llama.cpp splits each call into N-token micro-batches), chunks of 128
  faoff        flash attention off, chunks of 128
  exactK       an exact hit as the grid (K) makes it: re-feed the last (n-1) % K + 1 tokens
               (timed alone: compare with `exact1`, today's 1-token re-feed)

usage: exp5_speed.py [--len 1024] [--rounds 5] [--variants today,g32,g64,g128,g256,g512]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import Ctx, QUESTIONS, chat, every, grid, log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="today,g32,g64,g128,g256,g512")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    variants = a.variants.split(",")
    ctxs: dict[tuple, Ctx] = {}

    def ctx_for(v: str) -> Ctx:
        key = ("ub", int(v[2:])) if v.startswith("ub") else ("fa", False) if v == "faoff" else ("base",)
        if key not in ctxs:
            if key[0] == "ub":
                ctxs[key] = Ctx(threads=a.threads, n_ubatch=key[1])
            elif key[0] == "fa":
                ctxs[key] = Ctx(threads=a.threads, flash=False)
            else:
                ctxs[key] = Ctx(threads=a.threads)
        return ctxs[key]

    base = ctx_for("today")
    text = "".join(chat(q) for q in QUESTIONS * 8)
    toks = base.tokenize(text)[: a.len]
    n = len(toks)

    def cuts(v: str) -> list[int]:
        if v.startswith("g"):
            return grid(0, n, int(v[1:]))
        return every(0, n, 128)

    for v in variants:  # warm-up every context
        c = ctx_for(v)
        c.clear()
        c.prefill(0, toks[:128], [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(a.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            c = ctx_for(v)
            c.clear()
            t0 = time.perf_counter()
            c.prefill(0, toks, cuts(v))
            times[v].append(time.perf_counter() - t0)
    log(f"prefill of {n} tokens, threads={a.threads}, {a.rounds} rounds (FA auto unless faoff)")
    for v in variants:
        med = statistics.median(times[v])
        rr = [t / b for t, b in zip(times[v], times["today"])]
        log(f"  {v:6s} {n / med:7.1f} tok/s  time/today: median {statistics.median(rr):.3f}"
            f"  per round {' '.join(f'{x:.3f}' for x in rr)}")


if __name__ == "__main__":
    main()
