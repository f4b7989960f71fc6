"""The plain llama-cpp-python loop erllama is measured against: low-level bindings only.

One context with erllama's settings (per-sequence KV, ``n_ctx`` cells per sequence, the
same batch, threads and flash attention). ``generate`` prefills every prompt into its own
sequence in one batch, then samples greedily and decodes one token per sequence per step,
all sequences in ONE ``llama_decode``: the simplest correct batched loop, with no engine.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import FLASH_ATTN, N_BATCH, on_own_thread


class RawLoop:
    def __init__(self, model_path: Path, threads: int, *, n_seq: int = 1, n_ctx: int) -> None:
        import llama_cpp as L

        from erllama.backends.llama_native import ensure_backend

        self.L = L
        ensure_backend()  # llama_backend_init once, llama.cpp's log routed to logging
        self.n_seq = n_seq
        self.model = L.llama_model_load_from_file(
            str(model_path).encode(), L.llama_model_default_params()
        )
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.kv_unified = False
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if FLASH_ATTN else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cparams)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.batch = L.llama_batch_init(N_BATCH, 0, n_seq)
        self.sampler = L.llama_sampler_init_greedy()
        self.buf = ctypes.create_string_buffer(256)

    def _decode(self, rows: Sequence[tuple[int, Sequence[int], int]]) -> list[int]:
        """Decode ``(seq, tokens, start position)`` rows in one batch; logits on each row's
        last token. Returns the batch index of each row's logits."""
        L, b = self.L, self.batch
        i = 0
        out = []
        for seq, tokens, start in rows:
            for j, t in enumerate(tokens):
                b.token[i] = t
                b.pos[i] = start + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if j == len(tokens) - 1 else 0
                i += 1
            out.append(i - 1)
        b.n_tokens = i
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return out

    def generate(self, prompts: Sequence[Sequence[int]], n: int) -> dict[str, Any]:
        """Greedy-decode ``n`` tokens for each prompt (sequence i holds prompt i). Returns
        the tokens, the time of the first token, and per-step times. Computed on a thread of
        its own (see ``common.on_own_thread``)."""
        result: dict[str, Any] = on_own_thread(self._generate, prompts, n)
        return result

    def _generate(self, prompts: Sequence[Sequence[int]], n: int) -> dict[str, Any]:
        L = self.L
        assert len(prompts) <= self.n_seq
        mem = L.llama_get_memory(self.ctx)
        # One untimed token first: this fresh thread's first decode starts its OpenMP team
        # (milliseconds), which erllama's model thread has done before any timed request.
        L.llama_memory_clear(mem, True)
        self._decode([(0, prompts[0][:1], 0)])
        L.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        # Prefill as erllama does with prompts that fit one chunk each: one batch.
        rows = self._decode([(s, p, 0) for s, p in enumerate(prompts)])
        pos = [len(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        stamps: list[float] = []
        for step in range(n):
            sampled = []
            for s, row in enumerate(rows):
                tok = int(L.llama_sampler_sample(self.sampler, self.ctx, row))
                L.llama_token_to_piece(self.vocab, tok, self.buf, 256, 0, False)
                out[s].append(tok)
                sampled.append(tok)
            stamps.append(time.perf_counter())
            if step == n - 1:
                break
            rows = self._decode([(s, (tok,), pos[s]) for s, tok in enumerate(sampled)])
            for s in range(len(prompts)):
                pos[s] += 1
        return {"t0": t0, "stamps": stamps, "tokens": out}

    def close(self) -> None:
        L = self.L
        L.llama_sampler_free(self.sampler)
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
