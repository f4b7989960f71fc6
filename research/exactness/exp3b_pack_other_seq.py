"""Q3 follow-up: with per-sequence KV streams (kv_unified off, n_seq_max 4), a state packed from
sequence s != 0 differs in most bytes from the same KV packed from sequence 0. Is it still a
faithful state? Prefill a prompt into seq s, pack it (P_s), and compare:
  * P_s vs P_0 byte by byte (where do they differ: header / cell metadata / K / V?)
  * restore P_s into seq 0 of a cleared context, re-feed the last grid cell, compare logits and
    greedy tokens with the unbroken run in seq 0.

usage: exp3b_pack_other_seq.py [--nseq 4] [--unified] [--G 64]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import Ctx, grid, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nseq", type=int, default=4)
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--G", type=int, default=64)
    ap.add_argument("--gen", type=int, default=12)
    a = ap.parse_args()
    G = a.G
    ctx = Ctx(n_seq=a.nseq, unified=a.unified, threads=1, n_ctx_seq=2048)
    p = prompts(ctx, 1)[0]
    n = len(p)
    k = (n - 1) // G * G
    packs = {}
    for s in range(a.nseq):
        ctx.clear()
        ctx.prefill(s, p, grid(0, n, G))
        if s == 0:
            ref_lg = ctx.logits(0).tobytes()
            ref_gen, _ = ctx.greedy(0, a.gen)
            ctx.clear()
            ctx.prefill(s, p, grid(0, n, G))
        packs[s] = ctx.pack(s)
    A = np.frombuffer(packs[0], np.uint8)
    log(f"config {vars(a)} n={n} state {len(A)} bytes")
    for s in range(1, a.nseq):
        B = np.frombuffer(packs[s], np.uint8)
        d = np.nonzero(A != B)[0]
        log(f"  P_{s} vs P_0: {len(d)} bytes differ; first at {d[:1]}, last at {d[-1:]}"
            f"; zero bytes in P_0 {int((A == 0).sum())}, in P_{s} {int((B == 0).sum())}")
        ctx.clear()
        ctx.unpack(0, packs[s])
        ctx.rm(0, k)
        ctx.prefill(0, p[k:], [])
        lg = ctx.logits(0).tobytes()
        gen, _ = ctx.greedy(0, a.gen)
        log(f"    restored into seq 0: logits {'=' if lg == ref_lg else '!='}, greedy {'=' if gen == ref_gen else '!='}")
    # head of the two states, to see what the layout looks like
    log("  P_0 head: " + packs[0][:64].hex())
    log("  P_1 head: " + packs[1][:64].hex())


if __name__ == "__main__":
    main()
