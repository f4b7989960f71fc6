"""Q2: does grid-anchored chunking make restores exact?

The cold run of prompt P (n tokens): prefill in chunks cut at multiples of G, logits on the last
token, then greedy decode. Each warm case below restores a state saved by another run and feeds
the rest; it is compared with the cold run bitwise (KV after the prompt, last-token logits) and
by its greedy continuation.

  grid      partial hit: donor prompt D (shares m tokens with P) prefilled on the grid up to
            b = largest multiple of G <= m, packed there; warm = unpack + feed [b, n) on the grid
  trim      trimmed restore: donor D prefilled whole on the grid and packed at its end;
            warm = unpack, seq_rm(b..), feed [b, n) on the grid
  trim_m    as trim but cut at m itself (not on the grid), then feed [m, n) on the grid
  today     as trim_m but feeding [m, n) in chunks of 128 counted from m (erllama today)
  exact1    exact hit as erllama does it today: P's own state, seq_rm(n-1), re-feed 1 token
  exactG    exact hit, grid: P's own state, seq_rm(k) with k = largest multiple of G <= n-1,
            re-feed [k, n) in one call
  turn2     multi-turn: P's cold run decodes `gen` tokens; the next prompt
            Q = P + those tokens + <|im_end|> + a new user turn. Cold(Q) on the grid vs
            warm = the live cells of turn 1 trimmed to the largest grid multiple b <= the shared
            part, feed [b, len(Q)) on the grid. (Cells of generated tokens were made by
            1-token decodes, not by prefill.)
  turn2p    as turn2 but trimmed to the largest grid multiple <= len(P) (only prefilled cells kept)

usage: exp2_grid.py --G 64 [--prompts 12] [--flash auto] [--threads 2] [--gen 32]
"""

from __future__ import annotations

import argparse

from common import Ctx, every, grid, log, prompts


def common_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--G", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--flash", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threads-batch", type=int, default=None)
    ap.add_argument("--nseq", type=int, default=1)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--cases", default="grid,trim,trim_m,today,exact1,exactG,turn2,turn2p")
    ap.add_argument("--long", action="store_true", help="use the long-question prompt set")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    G = a.G
    ctx = Ctx(n_seq=a.nseq, threads=a.threads, threads_batch=a.threads_batch, flash=flash)
    S = 0
    allp = prompts(ctx, long=a.long)
    ps = allp[a.offset : a.offset + a.prompts]
    cases = a.cases.split(",")
    log(f"config: {vars(a)}")
    tally: dict[str, list[int]] = {}
    follow = ctx.tokenize("<|im_end|>\n<|im_start|>user\nThanks! One more question: do you ship to Canada?<|im_end|>\n<|im_start|>assistant\n")

    def cold(p: list[int]) -> tuple[bytes, bytes, list[int]]:
        ctx.clear()
        ctx.prefill(S, p, grid(0, len(p), G))
        kv, lg = ctx.pack(S), ctx.logits(S).tobytes()
        gen, _ = ctx.greedy(S, a.gen)
        return kv, lg, gen

    def finish(p: list[int]) -> tuple[bytes, bytes, list[int]]:
        kv, lg = ctx.pack(S), ctx.logits(S).tobytes()
        gen, _ = ctx.greedy(S, a.gen)
        return kv, lg, gen

    for i, p in enumerate(ps):
        n = len(p)
        d = allp[(a.offset + i + 1) % len(allp)]
        m = common_len(p, d)
        b = m // G * G
        ref = cold(p)
        turn1_gen = ref[2]
        results = {}
        if "grid" in cases:
            ctx.clear()
            ctx.prefill(S, d[:b], grid(0, b, G), logits=False)
            st = ctx.pack(S)
            ctx.clear()
            ctx.unpack(S, st)
            ctx.prefill(S, p[b:], grid(b, n, G))
            results["grid"] = finish(p)
        if any(c in cases for c in ("trim", "trim_m", "today")):
            ctx.clear()
            ctx.prefill(S, d, grid(0, len(d), G))
            donor = ctx.pack(S)
            for name, cut, cuts in (
                ("trim", b, grid(b, n, G)),
                ("trim_m", m, grid(m, n, G)),
                ("today", m, every(m, n, 128)),
            ):
                if name not in cases:
                    continue
                ctx.clear()
                ctx.unpack(S, donor)
                ctx.rm(S, cut)
                ctx.prefill(S, p[cut:], cuts)
                results[name] = finish(p)
        if "exact1" in cases or "exactG" in cases:
            ctx.clear()
            ctx.prefill(S, p, grid(0, n, G))
            own = ctx.pack(S)
            for name, cut in (("exact1", n - 1), ("exactG", (n - 1) // G * G)):
                if name not in cases:
                    continue
                ctx.clear()
                ctx.unpack(S, own)
                ctx.rm(S, cut)
                ctx.prefill(S, p[cut:], [])
                results[name] = finish(p)
        if "turn2" in cases or "turn2p" in cases:
            q = p + turn1_gen + follow
            ref2 = cold(q)
            # turn 1 again, as a server would run it: grid prefill, then decode gen tokens
            ctx.clear()
            ctx.prefill(S, p, grid(0, n, G))
            ctx.greedy(S, a.gen)  # leaves p + gen[:-1]... the last sampled token is decoded too
            live = ctx.pack(S)
            held = p + turn1_gen  # greedy() decodes every sampled token, so all are in the KV
            shared = common_len(held, q)
            for name, lim in (("turn2", shared), ("turn2p", n)):
                if name not in cases:
                    continue
                bb = lim // G * G
                ctx.clear()
                ctx.unpack(S, live)
                ctx.rm(S, bb)
                ctx.prefill(S, q[bb:], grid(bb, len(q), G))
                results[name] = (finish(q), ref2)
        line = [f"p{i:02d} n={n} m={m} b={b}"]
        for name in cases:
            if name not in results:
                continue
            r = results[name]
            rf = ref
            if name.startswith("turn2"):
                r, rf = r
            k = r[0] == rf[0]
            lsame = r[1] == rf[1]
            g = r[2] == rf[2]
            first = next((j for j in range(a.gen) if r[2][j] != rf[2][j]), None)
            t = tally.setdefault(name, [0, 0, 0, 0])
            t[0] += k
            t[1] += lsame
            t[2] += g
            t[3] += 1
            line.append(f"{name}:{'K' if k else 'k'}{'L' if lsame else 'l'}{'G' if g else 'g' + str(first)}")
        log("  ".join(line))
    log(f"summary G={G} (equal to the cold grid run: kv bytes, last logits, greedy {a.gen}):")
    for name, (k, l, g, tot) in tally.items():
        log(f"  {name:8s} kv {k}/{tot}  logits {l}/{tot}  greedy {g}/{tot}")


if __name__ == "__main__":
    main()
