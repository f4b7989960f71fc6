"""Diagnostic: a prompt token fed as a 1-token micro-batch, alone or beside another sequence.

Prompt P into seq 0 of a 4-sequence context (per-sequence KV). Variants (cut = 100):
  one       P in one call
  mid1      [0,100) [100] [101,n)                       (token 100 alone, single stream)
  mid1+s1   same, but the [100] call also carries a decode row of seq 1 (adjacent id: one
            micro-batch {s0:1, s1:1})
  mid1+s2   same with seq 2 (not adjacent: micro-batches {s0:1} and {s2:1})
Compared: KV of seq 0 (bytes) and last logits with `one`.

usage: diag_onetoken.py --flash off|auto [--prompts 0,1,2] [--threads 1]
"""

from __future__ import annotations

import argparse

from common import Ctx, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flash", default="off")
    ap.add_argument("--prompts", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cut", type=int, default=100)
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    ctx = Ctx(n_seq=4, threads=a.threads, flash=flash, n_ctx_seq=1024)
    allp = prompts(ctx)
    c = a.cut
    for i in map(int, a.prompts.split(",")):
        p = allp[i]
        n = len(p)
        out = {}
        for v in ("one", "mid1", "mid1+s1", "mid1+s2"):
            ctx.clear()
            other = {"mid1+s1": 1, "mid1+s2": 2}.get(v)
            if other:
                ctx.prefill(other, allp[-1][:50], [])
                filler = int(ctx.logits(other).argmax())
            if v == "one":
                ctx.prefill(0, p, [])
            else:
                ctx.decode([(0, p[:c], False)])
                parts = [(0, p[c : c + 1], False)]
                if other:
                    parts.append((other, [filler], True))
                ctx.decode(parts)
                ctx.decode([(0, p[c + 1 :], True)])
            out[v] = (ctx.pack(0), ctx.logits(0).tobytes())
        log(f"p{i:02d} n={n} flash={a.flash}: " + "  ".join(
            f"{v}: kv {'=' if out[v][0] == out['one'][0] else '!='} logits {'=' if out[v][1] == out['one'][1] else '!='}"
            for v in out if v != "one"))


if __name__ == "__main__":
    main()
