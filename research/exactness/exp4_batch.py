"""Q4: does a sequence's result depend on what else is in its llama_decode?

Context with --nseq sequences. Each of nseq prompts is prefilled alone into its own sequence
(grid G). Then greedy decoding of --gen tokens:
  alone     each step: one llama_decode per sequence
  together  each step: one llama_decode with one row per sequence (sorted by seq id)
Compared per sequence: tokens and logits (bitwise), first differing step and the sequence's
context length there.

Then prefill mixing: sequence 0's prompt prefilled in G chunks, each chunk in the same
llama_decode as a 1-token decode row of sequence `--mixseq` (1 = adjacent id, 2 = not
adjacent): is sequence 0's KV / last logits / greedy the same as prefilled alone?

usage: exp4_batch.py [--nseq 4] [--gen 64] [--flash auto] [--threads 2] [--threads-batch N]
                     [--unified] [--G 64]
"""

from __future__ import annotations

import argparse
import time

from common import Ctx, grid, log, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nseq", type=int, default=4)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--flash", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threads-batch", type=int, default=None)
    ap.add_argument("--unified", action="store_true")
    ap.add_argument("--G", type=int, default=64)
    ap.add_argument("--offset", type=int, default=0, help="first prompt index")
    ap.add_argument("--skip-mix", action="store_true")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    G = a.G
    ctx = Ctx(n_seq=a.nseq, threads=a.threads, threads_batch=a.threads_batch, flash=flash,
              unified=a.unified, n_ctx_seq=2048)
    allp = prompts(ctx)
    ps = allp[a.offset : a.offset + a.nseq]
    log(f"config: {vars(a)}  prompt lengths {[len(p) for p in ps]}")

    def setup() -> dict[int, int]:
        ctx.clear()
        first = {}
        for s, p in enumerate(ps):
            ctx.prefill(s, p, grid(0, len(p), G))
            first[s] = int(ctx.logits(s).argmax())
            ctx.rows = {}
        return first

    # logits rows are per batch: after prefilling seq s alone the rows of the others are gone,
    # so the first token of each is taken right after its own prefill.
    def run(mode: str):
        first = setup()
        toks = {s: [first[s]] for s in range(a.nseq)}
        digs = {s: [] for s in range(a.nseq)}
        t0 = time.perf_counter()
        for _ in range(a.gen):
            if mode == "alone":
                for s in range(a.nseq):
                    ctx.decode([(s, [toks[s][-1]], True)])
                    lg = ctx.logits(s)
                    digs[s].append(lg.tobytes())
                    toks[s].append(int(lg.argmax()))
            else:
                ctx.decode([(s, [toks[s][-1]], True) for s in range(a.nseq)])
                for s in range(a.nseq):
                    lg = ctx.logits(s)
                    digs[s].append(lg.tobytes())
                    toks[s].append(int(lg.argmax()))
        dt = time.perf_counter() - t0
        return toks, digs, a.gen * a.nseq / dt

    A = run("alone")
    T = run("together")
    log(f"decode tok/s: alone {A[2]:.1f}  together {T[2]:.1f}  (ratio {T[2] / A[2]:.2f})")
    for s in range(a.nseq):
        n = len(ps[s])
        fl = next((j for j in range(a.gen) if A[1][s][j] != T[1][s][j]), None)
        ft = next((j for j in range(a.gen + 1) if A[0][s][j] != T[0][s][j]), None)
        log(f"  seq{s} n={n}: logits first differ at step {fl}"
            f" (context {None if fl is None else n + fl + 1} cells)"
            f"; tokens {'same' if ft is None else f'differ from token {ft}'}")

    if a.skip_mix or a.nseq < 2:
        return
    # ---- prefill mixed with another sequence's decode rows --------------------------------
    log("prefill mixing (seq 0 prefill chunks + a decode row of another sequence):")
    for i in range(min(6, len(allp))):
        p = allp[i]
        n = len(p)
        ctx.clear()
        ctx.prefill(0, p, grid(0, n, G))
        ref_kv, ref_lg = ctx.pack(0), ctx.logits(0).tobytes()
        ref_gen, _ = ctx.greedy(0, 16)
        res = []
        for other in range(1, min(a.nseq, 3)):
            ctx.clear()
            ctx.prefill(other, allp[-1], grid(0, len(allp[-1]), G))
            filler = int(ctx.logits(other).argmax())
            cuts = [0] + grid(0, n, G) + [n]
            for x, z in zip(cuts, cuts[1:]):
                ctx.decode(sorted([(0, p[x:z], z == n), (other, [filler], True)]))
            kv, lg = ctx.pack(0), ctx.logits(0).tobytes()
            gen, _ = ctx.greedy(0, 16)
            res.append(f"with seq{other}: kv {'=' if kv == ref_kv else '!='} logits "
                       f"{'=' if lg == ref_lg else '!='} greedy {'=' if gen == ref_gen else '!='}")
        log(f"  p{i:02d} n={n}: " + "; ".join(res))


if __name__ == "__main__":
    main()
