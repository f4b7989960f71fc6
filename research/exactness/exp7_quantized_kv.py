"""Q7: with a quantized KV cache (q8_0) and flash attention, is every cell batch-invariant?

Why it might be: ggml's CPU flash-attention kernel takes its tiled path (64 query rows of a
sequence at once) and its split-KV path (one query row, its cells split across threads)
only for f16/f32 K and V (ops.cpp, ggml_compute_forward_flash_attn_ext_f16). With q8_0 K/V
every row takes the per-row kernel, computed by one thread over its cells in order; the
weight matmuls take one vec_dot per output element whatever the batch. If so, a cell does
not depend on how its prompt was cut, what shares the call, or whether it was generated
one token at a time, and a decoded reply's cells equal a cold prefill of the same tokens.

For each prompt, against A (chunks of 512, the reference):
  B  one token per call (every cell computed as a decode step computes it)
  C  chunks of 7
  D  chunks of 37, each call shared with sequence 1 decoding one row and sequence 2
     prefilling 64 rows of another prompt (cut into equal micro-batches by llama.cpp)
  E  A, then 24 greedy tokens decoded one per call; against a cold prefill (chunks of 512)
     of prompt + those tokens: logits after the last token, and the sequence's state bytes
Compared bit for bit: the logits after the prompt's last token, and the state bytes.
Then the speed: prefill of a 1,000-token prompt and 64 decode steps, q8_0 against f16.

usage: exp7_quantized_kv.py [--kv q8_0|f16] [--threads 2] [--speed]
"""

from __future__ import annotations

import argparse
import hashlib
import time

import llama_cpp as L
from common import QUESTIONS, SYSTEM, Ctx, chat

KV = {"q8_0": L.GGML_TYPE_Q8_0, "f16": L.GGML_TYPE_F16, "q4_0": L.GGML_TYPE_Q4_0}


def dig(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=6).hexdigest()


def feed(c: Ctx, seq: int, toks: list[int], step: int, other: list[int] | None = None) -> str:
    for i in range(0, len(toks), step):
        part = toks[i : i + step]
        last = i + step >= len(toks)
        parts = [(seq, part, last)]
        if other is not None:
            parts = [(1, [other[i % len(other)]], False), (2, other[:64], False), *parts]
        c.decode(parts)
        if other is not None:
            c.rm(2, 0)
    return dig(c.logits(seq).tobytes())


def run(kv: int, threads: int) -> None:
    c = Ctx(n_seq=3, flash=True, threads=threads, type_kv=kv)
    long_sys = SYSTEM * 5
    prompts = [chat(q) for q in QUESTIONS[:6]] + [chat(q, long_sys) for q in QUESTIONS[:3]]
    other = c.tokenize(chat(QUESTIONS[-1]))
    same = {k: 0 for k in "BCDE"}
    for text in prompts:
        toks = c.tokenize(text)
        c.clear()
        ref = feed(c, 0, toks, 512)
        ref_state = dig(c.pack(0))
        gen = []
        for _ in range(24):  # E: decode one token per call
            t = int(c.logits(0).argmax())
            gen.append(t)
            c.decode([(0, [t], True)])
        gen_logits = dig(c.logits(0).tobytes())
        gen_state = dig(c.pack(0))
        got = {}
        for name, step, oth in (("B", 1, None), ("C", 7, None), ("D", 37, other)):
            c.clear()
            if oth is not None:
                c.decode([(1, oth[:40], False)])  # sequence 1 has a context of its own
            got[name] = (feed(c, 0, toks, step, oth), dig(c.pack(0)))
        c.clear()
        got["E"] = (feed(c, 0, toks + gen, 512), dig(c.pack(0)))
        for k in "BCD":
            same[k] += got[k] == (ref, ref_state)
        same["E"] += got["E"] == (gen_logits, gen_state)
        print(len(toks), {k: ("=" if (got[k] == ((gen_logits, gen_state) if k == "E" else (ref, ref_state))) else "DIFF") for k in got}, flush=True)
    print(f"equal of {len(prompts)}:", same, flush=True)
    c.free()


def speed(kv: int, threads: int) -> None:
    c = Ctx(n_seq=1, flash=True, threads=threads, type_kv=kv)
    toks = c.tokenize(SYSTEM * 9)[:1000]
    rates = []
    for _ in range(3):
        c.clear()
        t0 = time.perf_counter()
        feed(c, 0, toks, 512)
        pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(64):
            c.decode([(0, [int(c.logits(0).argmax())], True)])
        dec = time.perf_counter() - t0
        rates.append((len(toks) / pre, 64 / dec))
    print("prefill tok/s, decode tok/s:", [(round(a), round(b)) for a, b in rates], flush=True)
    c.free()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    a = ap.parse_args()
    (speed if a.speed else run)(KV[a.kv], a.threads)
