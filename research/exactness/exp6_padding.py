"""Q6: can a short chunk be computed exactly like a full one by padding it?

A chunk shorter than 64 tokens runs llama.cpp's per-row attention kernel on the CPU, so a
prompt's last partial grid cell is computed differently from the same tokens inside a full
chunk (docs/caching.md, rule 4). Hypothesis: every row of a micro-batch is computed
independently of the other rows' values (matmuls row by row, attention per query row under
a mask that depends on positions only), given the kernel. Then a short chunk padded with
filler tokens at the following positions up to 64 rows (the fillers' cells removed after)
computes its real rows bit for bit as a full chunk holding real tokens there does.

Reference R: the prompt fed on the grid [jG, (j+1)G), every chunk padded to a full cell.
Compared with R (last prompt logits bitwise, then 24 greedy tokens):
  A  the first p tokens as R, then the rest in chunks of G rows starting at p (off the grid),
     padded: a restore at an arbitrary point, then whole-size chunks;
  B  the same with another filler token: the fillers' values must not matter;
  C  the prompt fed in chunks of 100 then the rest, unpadded except the last (chunks larger
     than G rows);
  D  control, today's cold run: grid chunks, the last one short and unpadded (per-row
     kernel): expected to differ from R somewhere, which shows the comparison can fail.

    python exp6_padding.py [threads]
"""

from __future__ import annotations

import sys

import numpy as np

from common import Ctx, prompts

G = 64
GEN = 24


def feed(ctx: Ctx, seq: int, toks: list[int], start: int, sizes: list[int], pad: int | None,
         filler: int) -> np.ndarray:
    """Feed toks[start:] from position start in chunks of ``sizes`` (the last one repeated);
    with ``pad``, each chunk shorter than ``pad`` rows gets fillers up to ``pad`` rows, whose
    cells are removed after. Returns the logits of the last real token."""
    assert ctx.pos[seq] == start
    at, k, last = start, 0, None
    while at < len(toks):
        size = sizes[min(k, len(sizes) - 1)]
        chunk = toks[at : at + size]
        real = len(chunk)
        rows = chunk + [filler] * (pad - real) if pad and real < pad else chunk
        # logits on the last real row only
        b = ctx.batch
        for i, t in enumerate(rows):
            b.token[i] = t
            b.pos[i] = at + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if i == real - 1 else 0
        b.n_tokens = len(rows)
        import llama_cpp as L

        assert L.llama_decode(ctx.ctx, b) == 0
        ptr = L.llama_get_logits_ith(ctx.ctx, real - 1)
        last = np.ctypeslib.as_array(ptr, shape=(ctx.n_vocab,)).copy()
        ctx.pos[seq] = at + len(rows)
        if len(rows) > real:
            ctx.rm(seq, at + real)
        at += real
        k += 1
    assert last is not None
    return last


def greedy_from(ctx: Ctx, seq: int, logits: np.ndarray, n: int) -> list[int]:
    out = []
    lg = logits
    for _ in range(n):
        t = int(lg.argmax())
        out.append(t)
        ctx.decode([(seq, [t], True)])
        lg = ctx.logits(seq)
    return out




def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    ctx = Ctx(threads=threads)
    cases = prompts(ctx, long=True) + prompts(ctx, 4)
    tally = {k: [0, 0, 0] for k in "ABCD"}  # logits equal, tokens equal, cases
    for n_case, toks in enumerate(cases):
        n = len(toks)
        p = max(1, (n * 3) // 5 | 1)  # an odd point, off the grid

        def run(name: str) -> tuple[np.ndarray, list[int]]:
            ctx.clear()
            if name == "R":
                lg = feed(ctx, 0, toks, 0, [G], G, filler=0)
            elif name in "AB":
                filler = 0 if name == "A" else 1234
                feed(ctx, 0, toks[:p], 0, [G], G, filler=filler)  # the first p tokens as R
                lg = feed(ctx, 0, toks, p, [G], G, filler=filler)
            elif name == "C":
                lg = feed(ctx, 0, toks, 0, [100], G, filler=0)
            else:
                lg = feed(ctx, 0, toks, 0, [G], None, filler=0)
            return lg, greedy_from(ctx, 0, lg, GEN)

        ref_logits, ref = run("R")
        line = [f"case {n_case:2d} n={n:4d} p={p:4d}"]
        for name in "ABCD":
            lg, gen = run(name)
            same_logits = bool(np.array_equal(lg, ref_logits))
            same_tokens = gen == ref
            tally[name][0] += same_logits
            tally[name][1] += same_tokens
            tally[name][2] += 1
            line.append(f"{name}:{'=' if same_logits else 'x'}{'=' if same_tokens else 'x'}")
        print("  ".join(line), flush=True)
    print(f"threads {threads}, G {G}; logits equal / tokens equal / cases:")
    for name, (lo, to, c) in tally.items():
        print(f"  {name}: {lo}/{c} logits, {to}/{c} tokens")


if __name__ == "__main__":
    main()
