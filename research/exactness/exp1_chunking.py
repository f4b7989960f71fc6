"""Q1: does the way a cold prompt is split into llama_decode calls change the result?

For each prompt: prefill it in one call (the reference), then in other splits; compare
  * the KV state bytes after the prompt (llama_state_seq_get_data),
  * the logits of the last prompt token, bitwise,
  * the greedy continuation (N tokens).

usage: exp1_chunking.py [--prompts 12] [--flash auto|on|off] [--threads 2] [--ubatch N]
                        [--batch 512] [--nseq 1] [--unified] [--gen 24] [--seq 0]
"""

from __future__ import annotations

import argparse

from common import Ctx, every, log, prompts


def cold_point(n: int, trim: int = 32, align: int = 64, lo: int = 128) -> int | None:
    """erllama's cold_save_point with the default policy."""
    if n < lo:
        return None
    u = n - trim
    if u < align:
        return None
    p = u // align * align
    return p if p >= 32 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--flash", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ubatch", type=int, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--nseq", type=int, default=1)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--variants", default="c128,cold128,c64,c63,c32,c7,last1")
    ap.add_argument("--long", action="store_true", help="use the long-question prompt set")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    ctx = Ctx(
        n_seq=a.nseq, n_batch=a.batch, n_ubatch=a.ubatch, threads=a.threads,
        flash=flash, unified=a.unified,
    )
    seq = a.seq
    ps = prompts(ctx, long=a.long)[a.offset : a.offset + a.prompts]
    log(f"config: {vars(a)}  prompt lengths {[len(p) for p in ps]}")

    def splits(n: int) -> dict[str, list[int]]:
        out = {}
        for v in a.variants.split(","):
            if v == "last1":
                out[v] = [n - 1]
            elif v == "cold128":
                cp = cold_point(n)
                cuts = sorted(set(every(0, n, 128) if cp is None else
                                  [c for c in every(0, cp, 128)] + [cp] + every(cp, n, 128)))
                out[v] = cuts
            elif v.startswith("c"):
                out[v] = every(0, n, int(v[1:]))
        return out

    tally = {}
    for i, p in enumerate(ps):
        n = len(p)
        ctx.clear()
        ctx.prefill(seq, p, [])
        ref_kv = ctx.pack(seq)
        ref_lg = ctx.logits(seq).tobytes()
        ref_gen, _ = ctx.greedy(seq, a.gen)
        line = [f"p{i:02d} n={n}"]
        groups = {(ref_kv, ref_lg): ["one"]}
        for name, cuts in splits(n).items():
            ctx.clear()
            ctx.prefill(seq, p, cuts)
            kv = ctx.pack(seq)
            lg = ctx.logits(seq).tobytes()
            gen, _ = ctx.greedy(seq, a.gen)
            kv_same = kv == ref_kv
            lg_same = lg == ref_lg
            g_same = gen == ref_gen
            first = next((k for k in range(a.gen) if gen[k] != ref_gen[k]), None)
            t = tally.setdefault(name, [0, 0, 0])
            t[0] += kv_same
            t[1] += lg_same
            t[2] += g_same
            line.append(f"{name}:{'K' if kv_same else 'k'}{'L' if lg_same else 'l'}"
                        f"{'G' if g_same else 'g' + str(first)}")
            groups.setdefault((kv, lg), []).append(name)
        # variants whose KV and logits are bitwise identical to each other
        eq = [g for g in groups.values() if len(g) > 1]
        log("  ".join(line) + "   identical groups: " + (" | ".join("=".join(g) for g in eq) or "-"))
    log(f"summary over {len(ps)} prompts (equal to the one-call reference: kv, last logits, "
        f"greedy {a.gen}):")
    for name, (k, l, g) in tally.items():
        log(f"  {name:8s} kv {k}/{len(ps)}  logits {l}/{len(ps)}  greedy {g}/{len(ps)}")


if __name__ == "__main__":
    main()
