"""Q3: is a restored state bitwise the state that was computed, and does the sequence id matter?

For each prompt, in a context with --nseq sequences:
  * prefill into seq 0 (grid G), pack -> A
  * clear, unpack A into seq 0, pack -> B          (round trip; A == B?)
  * clear, unpack A into seq s (s = 1..nseq-1), pack -> C_s   (C_s == A?)
  * continue from each restore with the same suffix chunk (last G-grid chunk re-fed, as an
    exact hit on the grid) and compare logits and greedy tokens with the unbroken run in seq 0
  * with other sequences holding cells (seq 0 busy with another prompt), restore into seq 1
    (matters for a unified KV pool, where cell indices are shared)

usage: exp3_state.py [--nseq 4] [--unified] [--prompts 6] [--G 64] [--gen 16]
"""

from __future__ import annotations

import argparse

from common import Ctx, grid, kv_diff, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nseq", type=int, default=4)
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--G", type=int, default=64)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flash", default="auto")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    G = a.G
    ctx = Ctx(n_seq=a.nseq, unified=a.unified, threads=a.threads, flash=flash, n_ctx_seq=2048)
    ps = prompts(ctx, a.prompts)
    log(f"config: {vars(a)}")
    ok = {"roundtrip": 0, "other_seq_bytes": 0, "other_seq_gen": 0, "busy_gen": 0, "busy_bytes": 0}
    tot = {k: 0 for k in ok}
    for i, p in enumerate(ps):
        n = len(p)
        k = (n - 1) // G * G
        ctx.clear()
        ctx.prefill(0, p, grid(0, n, G))
        ref_lg = ctx.logits(0).tobytes()
        A = ctx.pack(0)
        ref_gen, _ = ctx.greedy(0, a.gen)
        ctx.clear()
        ctx.unpack(0, A)
        B = ctx.pack(0)
        ok["roundtrip"] += A == B
        tot["roundtrip"] += 1
        line = [f"p{i:02d} n={n} state {len(A)} B roundtrip {'same' if A == B else 'DIFF'}"]
        for s in range(a.nseq):
            ctx.clear()
            ctx.unpack(s, A)
            C = ctx.pack(s)
            ctx.rm(s, k)
            ctx.prefill(s, p[k:], [])
            lg = ctx.logits(s).tobytes()
            gen, _ = ctx.greedy(s, a.gen)
            if s:
                ok["other_seq_bytes"] += C == A
                ok["other_seq_gen"] += gen == ref_gen and lg == ref_lg
                tot["other_seq_bytes"] += 1
                tot["other_seq_gen"] += 1
            line.append(f"seq{s}: bytes {'=' if C == A else kv_diff(A, C)} logits {'=' if lg == ref_lg else '!='}"
                        f" greedy {'=' if gen == ref_gen else '!='}")
        if a.nseq > 1:
            # seq 0 busy with another prompt's cells first, then restore into seq 1
            ctx.clear()
            other = ps[(i + 1) % len(ps)]
            ctx.prefill(0, other, grid(0, len(other), G), logits=False)
            ctx.unpack(1, A)
            C = ctx.pack(1)
            ctx.rm(1, k)
            ctx.prefill(1, p[k:], [])
            lg = ctx.logits(1).tobytes()
            gen, _ = ctx.greedy(1, a.gen)
            ok["busy_bytes"] += C == A
            ok["busy_gen"] += gen == ref_gen and lg == ref_lg
            tot["busy_bytes"] += 1
            tot["busy_gen"] += 1
            line.append(f"busy->seq1: bytes {'=' if C == A else kv_diff(A, C)} logits {'=' if lg == ref_lg else '!='}"
                        f" greedy {'=' if gen == ref_gen else '!='}")
        log("  ".join(line))
    log("summary: " + ", ".join(f"{k} {ok[k]}/{tot[k]}" for k in ok if tot[k]))


if __name__ == "__main__":
    main()
