"""Q3 follow-up: does the physical cell layout matter (unified KV pool vs per-sequence streams)?

Cold: prompt P alone in seq 1, cut at 128 ([0,128) then [128,n), both >= 64 tokens, so both use
the tiled FlashAttention path, whose KV tiles are 64 *cells* wide counted from cell 0).
Warm: another prompt occupies --busy cells of seq 0 first; then the state of P[:128] (packed from
a cold run) is restored into seq 1 and [128, n) is fed in one call, exactly as cold did.
With a unified pool, seq 1's cells now start at cell --busy instead of 0; with per-sequence
streams they start at 0 whatever seq 0 holds.

usage: exp3c_layout.py [--unified] [--busy 50] [--prompts 3]
"""

from __future__ import annotations

import argparse

from common import Ctx, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--busy", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--flash", default="auto")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    ctx = Ctx(n_seq=2, unified=a.unified, threads=1, flash=flash, n_ctx_seq=1024)
    ps = prompts(ctx)
    filler = ps[-1]
    for i, p in enumerate(ps[: a.prompts]):
        n = len(p)
        ctx.clear()
        ctx.prefill(1, p[:128], [], logits=False)
        st = ctx.pack(1)
        ctx.prefill(1, p[128:], [])
        ref = (ctx.logits(1).tobytes(), ctx.greedy(1, 12)[0])
        out = []
        for busy in (0, a.busy):
            ctx.clear()
            if busy:
                ctx.prefill(0, filler[:busy], [], logits=False)
            ctx.unpack(1, st)
            ctx.prefill(1, p[128:], [])
            got = (ctx.logits(1).tobytes(), ctx.greedy(1, 12)[0])
            out.append(f"seq0 holding {busy} cells: logits {'=' if got[0] == ref[0] else '!='}"
                       f" greedy {'=' if got[1] == ref[1] else '!='}")
        log(f"p{i:02d} n={n} unified={a.unified}: " + "; ".join(out))


if __name__ == "__main__":
    main()
