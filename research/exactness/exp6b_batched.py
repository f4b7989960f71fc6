"""Q6b: padded chunks, continued (see exp6_padding.py).

  E  the whole prompt in one micro-batch (up to 512 rows) against R (64-row padded chunks);
  F  four sequences of a 4-sequence context fed together, each call holding one padded
     64-row chunk of every sequence (one llama_decode, 256 rows), against each sequence fed
     alone in the same context (64-row padded chunks, one sequence per call);
  G  as F, but the sequences' chunks of unequal length in one call (64 rows for two of them,
     128 for the others: llama.cpp then cuts the call into equal micro-batches).

Compared: each sequence's last prompt logits bitwise and 24 greedy tokens decoded after
(alone, one token per call).

    python exp6b_batched.py [threads]
"""

from __future__ import annotations

import sys

import llama_cpp as L
import numpy as np

from common import Ctx, prompts
from exp6_padding import GEN, G, feed, greedy_from


def batched(ctx: Ctx, seqs: list[int], toks: list[list[int]], sizes: dict[int, int]) -> dict[int, np.ndarray]:
    """Feed every sequence's tokens together: each call takes the next ``sizes[seq]`` rows of
    every unfinished sequence, padded to ``sizes[seq]``; fillers removed after each call."""
    at = {s: 0 for s in seqs}
    last: dict[int, np.ndarray] = {}
    while any(at[s] < len(toks[s]) for s in seqs):
        b = ctx.batch
        i = 0
        rows: dict[int, tuple[int, int]] = {}
        for s in seqs:
            if at[s] >= len(toks[s]):
                continue
            chunk = toks[s][at[s] : at[s] + sizes[s]]
            real = len(chunk)
            padded = chunk + [0] * (sizes[s] - real)
            for j, t in enumerate(padded):
                b.token[i] = t
                b.pos[i] = at[s] + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = s
                b.logits[i] = 1 if j == real - 1 else 0
                if j == real - 1:
                    rows[s] = (i, real)
                i += 1
        b.n_tokens = i
        assert L.llama_decode(ctx.ctx, b) == 0
        for s, (row, real) in rows.items():
            ptr = L.llama_get_logits_ith(ctx.ctx, row)
            last[s] = np.ctypeslib.as_array(ptr, shape=(ctx.n_vocab,)).copy()
            ctx.pos[s] = at[s] + sizes[s]
            if real < sizes[s]:
                ctx.rm(s, at[s] + real)
            at[s] += real
    return last


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    one = Ctx(threads=threads)
    cases = prompts(one, long=True)
    e_ok = [0, 0]
    for toks in cases:
        one.clear()
        ref_lg = feed(one, 0, toks, 0, [G], G, filler=0)
        ref = greedy_from(one, 0, ref_lg, GEN)
        one.clear()
        lg = feed(one, 0, toks, 0, [512], G, filler=0)
        gen = greedy_from(one, 0, lg, GEN)
        e_ok[0] += bool(np.array_equal(lg, ref_lg))
        e_ok[1] += gen == ref
    print(f"E (one micro-batch up to 512 rows vs 64-row chunks): {e_ok[0]}/{len(cases)} logits, "
          f"{e_ok[1]}/{len(cases)} tokens", flush=True)
    one.free()

    four = Ctx(threads=threads, n_seq=4, n_ctx_seq=2048)
    groups = [cases[i : i + 4] for i in range(0, len(cases) - 3, 4)]
    for name, sizes in (("F", {0: 64, 1: 64, 2: 64, 3: 64}), ("G", {0: 64, 1: 128, 2: 64, 3: 128})):
        ok = [0, 0, 0]
        for group in groups:
            alone = {}
            four.clear()
            for s, toks in enumerate(group):
                lg = feed(four, s, toks, 0, [sizes[s]], sizes[s], filler=0)
                alone[s] = (lg, greedy_from(four, s, lg, GEN))
            four.clear()
            together = batched(four, [0, 1, 2, 3], group, sizes)
            for s in range(4):
                gen = greedy_from(four, s, together[s], GEN)
                ok[0] += bool(np.array_equal(together[s], alone[s][0]))
                ok[1] += gen == alone[s][1]
                ok[2] += 1
        print(f"{name} (4 sequences per call, rows {list(sizes.values())}) vs alone: "
              f"{ok[0]}/{ok[2]} logits, {ok[1]}/{ok[2]} tokens", flush=True)


if __name__ == "__main__":
    main()
