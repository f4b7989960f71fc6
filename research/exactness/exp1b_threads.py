"""Q1 (threads): are prefill and decode results the same with 1 and 2 threads?

Two contexts in one process (n_threads = n_threads_batch = 1, and = 2). Each prompt is prefilled
in one call (the same cut set in both), then decoded greedily --gen tokens one at a time.
Compared: KV after the prompt, last logits, and the first decode step whose logits differ (with
the context length there: single-token FlashAttention switches to a KV-split path across threads
once the padded KV length reaches 512, i.e. past 256 used cells).

usage: exp1b_threads.py [--prompts 3] [--gen 40] [--flash auto]
"""

from __future__ import annotations

import argparse

from common import Ctx, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--gen", type=int, default=40)
    ap.add_argument("--flash", default="auto")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    c1 = Ctx(threads=1, flash=flash, n_ctx_seq=1024)
    c2 = Ctx(threads=2, flash=flash, n_ctx_seq=1024)
    for i, p in enumerate(prompts(c1, a.prompts)):
        res = []
        for c in (c1, c2):
            c.clear()
            c.prefill(0, p, [])
            kv = c.pack(0)
            toks, digs = c.greedy(0, a.gen)
            res.append((kv, toks, digs))
        first = next((j for j in range(a.gen) if res[0][2][j] != res[1][2][j]), None)
        log(f"p{i:02d} n={len(p)} flash={a.flash}: prompt KV {'=' if res[0][0] == res[1][0] else '!='};"
            f" decode logits first differ at step {first}"
            f" (context {None if first is None else len(p) + first} cells);"
            f" tokens {'same' if res[0][1] == res[1][1] else 'differ'}")


if __name__ == "__main__":
    main()
