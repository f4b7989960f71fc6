"""What a verify pass costs next to a one-token pass (issue 21's economics).

At a fixed position after a 200-token prompt: the time of a one-token ``llama_decode`` (one
decode thread), and of a (k+1)-token pass for k in 1, 3, 7, 15, on one thread and on two,
its cells removed after each call so every call sees the same context. Median of 40 calls.
Flash attention on, as ``ModelConfig.speculative`` loads. Run on a quiet machine:
PYTHONPATH=src .venv/bin/python research/speculative/verify_cost.py
"""

from __future__ import annotations

import statistics
import time

import llama_cpp as L

from erllama.backends.llama_native import ensure_backend
from erllama.bundled import bundled_model_path


def main() -> None:
    ensure_backend()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(bundled_model_path()).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 2048, 512, 512, 1
    cp.n_threads, cp.n_threads_batch = 1, 2
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(tokens: list[int], pos: int) -> None:
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        assert L.llama_decode(ctx, batch) == 0

    prompt = [100 + (i * 37) % 5000 for i in range(200)]
    for s in range(0, 200, 64):
        decode(prompt[s : s + 64], s)

    def timed(n: int, threads: int) -> float:
        L.llama_set_n_threads(ctx, 1, threads)
        times = []
        for _ in range(40):
            t0 = time.perf_counter()
            decode([300 + j for j in range(n)], 200)
            times.append(time.perf_counter() - t0)
            L.llama_memory_seq_rm(mem, 0, 200, -1)
        L.llama_set_n_threads(ctx, 1, 2)
        return statistics.median(times) * 1e3

    one = timed(1, 1)
    print(f"one-token pass (1 thread): {one:.2f} ms")
    for k in (1, 3, 7, 15):
        t1, t2 = timed(k + 1, 1), timed(k + 1, 2)
        print(
            f"k={k:2d}: {k + 1:2d}-token pass {t1:.2f} ms on 1 thread ({t1 / one:.2f}x), "
            f"{t2:.2f} ms on 2 ({t2 / one:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
