"""Diagnostic: which cells / layers of the KV differ between two splits of the same prompt.

Parses a single-stream sequence state (n_seq_max 1): magic, seq, n_stream, cell_count, cell
metadata (pos, n_seq_id, seq_id), v_trans, n_layer, then per layer K (type, row size, rows),
then per layer V (type, row size, rows) when not transposed.

usage: diag_kvcells.py --flash off --prompt 1 --variants last1,mid1,last2,c32
"""

from __future__ import annotations

import argparse
import struct

import numpy as np

from common import Ctx, every, log, prompts


def parse(state: bytes):
    off = 0
    magic, seqid, n_stream, cells = struct.unpack_from("<IiII", state, off)
    off += 16
    off += cells * 12
    v_trans, n_layer = struct.unpack_from("<II", state, off)
    off += 8
    k, v = [], []
    for _ in range(n_layer):
        t, row = struct.unpack_from("<iQ", state, off)
        off += 12
        k.append(np.frombuffer(state, np.uint16, cells * row // 2, off).reshape(cells, -1))
        off += cells * row
    if v_trans:
        for _ in range(n_layer):
            t, size_el, n_embd = struct.unpack_from("<iII", state, off)
            off += 12
            v.append(np.frombuffer(state, np.uint16, cells * n_embd, off).reshape(n_embd, cells).T)
            off += cells * n_embd * size_el
    else:
        for _ in range(n_layer):
            t, row = struct.unpack_from("<iQ", state, off)
            off += 12
            v.append(np.frombuffer(state, np.uint16, cells * row // 2, off).reshape(cells, -1))
            off += cells * row
    assert off == len(state), (off, len(state))
    return k, v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flash", default="off")
    ap.add_argument("--prompt", type=int, default=1)
    ap.add_argument("--variants", default="last1,mid1,last2,c32")
    a = ap.parse_args()
    flash = {"auto": None, "on": True, "off": False}[a.flash]
    ctx = Ctx(threads=1, flash=flash)
    p = prompts(ctx)[a.prompt]
    n = len(p)
    ctx.clear()
    ctx.prefill(0, p, [])
    ref = parse(ctx.pack(0))
    ref_lg = ctx.logits(0)
    for v in a.variants.split(","):
        cuts = {"last1": [n - 1], "last2": [n - 2], "mid1": [100, 101], "mid1b": [100, 101, n - 1]}.get(v)
        if cuts is None:
            cuts = every(0, n, int(v[1:]))
        ctx.clear()
        ctx.prefill(0, p, cuts)
        k, vv = parse(ctx.pack(0))
        lg = ctx.logits(0)
        bad = []
        for layer in range(len(k)):
            dk = np.nonzero((k[layer] != ref[0][layer]).any(axis=1))[0]
            dv = np.nonzero((vv[layer] != ref[1][layer]).any(axis=1))[0] if vv else []
            if len(dk) or len(dv):
                bad.append(f"L{layer}: K cells {list(dk[:6])}{'...' if len(dk) > 6 else ''} V cells {list(dv[:6])}")
        log(f"n={n} {v} cuts={cuts[:4]}{'...' if len(cuts) > 4 else ''}: logits {'=' if (lg == ref_lg).all() else f'max|d|={float(np.abs(lg - ref_lg).max()):.2e}'}; "
            f"{len(bad)} layers differ" + ("; first: " + " | ".join(bad[:3]) if bad else ""))


if __name__ == "__main__":
    main()
