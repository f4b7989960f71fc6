"""Does verifying a draft in one batched llama_decode give the logits that decoding the same
tokens one at a time gives? (Issue 21: greedy speculative output must equal plain decoding.)

For each flash-attention setting: prefill a prompt, decode N tokens greedily one call per
token (recording each step's logits), then restore the prompt's cells, and feed the same N
tokens as verify batches of k+1 tokens with logits on every row. Compare argmax and the raw
logits bit for bit. Run: PYTHONPATH=src .venv/bin/python research/speculative/verify_invariance.py
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp as L
import numpy as np

from erllama.bundled import bundled_model_path

LONG = " ".join(f"Line {i}: the ferry leaves at {i % 12 + 1} o'clock from pier {i % 7}." for i in range(40))
PROMPTS = [
    "Copy this text exactly: The quick brown fox jumps over the lazy dog near the river bank "
    "while the farmer watches from the old wooden fence. Copy: ",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# Rename a to x:\n",
]


def run(
    flash: bool, threads: int, k: int, n_gen: int = 48, verify_threads: int = 2, long: bool = False
) -> None:
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(bundled_model_path()).encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    nv = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx = 2048
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = 1
    cp.n_threads = threads
    cp.n_threads_batch = 2  # prefill
    cp.flash_attn_type = (
        L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(tokens: list[int], pos0: int, all_logits: bool) -> list[np.ndarray]:
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == len(tokens) - 1) else 0
        assert L.llama_decode(ctx, batch) == 0
        rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return [
            np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), shape=(nv,)).copy()
            for r in rows
        ]

    same_tok = same_bits = total = 0
    for text in [LONG + " Now repeat line 3:"] if long else PROMPTS:
        buf = (L.llama_token * 4096)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 4096, True, True)
        prompt = list(buf[:n])
        L.llama_memory_seq_rm(mem, 0, 0, -1)
        # Prefill on a 64 grid, as the engine does.
        last = None
        for s in range(0, len(prompt), 64):
            last = decode(prompt[s : s + 64], s, False)[-1]
        plain_logits = []
        toks = []
        cur = last
        pos = len(prompt)
        for _ in range(n_gen):
            t = int(cur.argmax())
            toks.append(t)
            cur = decode([t], pos, False)[-1]
            plain_logits.append(cur)
            pos += 1
        # Verify: same tokens, fed k+1 at a time with logits on every row.
        L.llama_memory_seq_rm(mem, 0, len(prompt), -1)
        L.llama_set_n_threads(ctx, threads, verify_threads)
        pos = len(prompt)
        ver_logits = []
        i = 0
        while i < n_gen:
            chunk = toks[i : i + k + 1]
            ver_logits += decode(chunk, pos, True)
            pos += len(chunk)
            i += len(chunk)
        L.llama_set_n_threads(ctx, threads, 2)
        for a, b in zip(plain_logits, ver_logits, strict=True):
            total += 1
            same_tok += int(a.argmax() == b.argmax())
            same_bits += int(np.array_equal(a, b))
    print(
        f"flash_attn={flash} decode_threads={threads} verify_threads={verify_threads} k={k}"
        f" long={long} (prompt {len(prompt)}): argmax equal {same_tok}/{total},"
        f" logits bit-equal {same_bits}/{total}",
        flush=True,
    )
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    if sys.argv[1:] == ["long"]:
        for threads, vthreads in ((1, 1), (1, 2), (2, 2), (2, 1)):
            for k in (3, 8):
                run(True, threads, k, verify_threads=vthreads, long=True)
    else:
        for flash in (False, True):
            for threads in (1, 2):
                for k in (3, 8):
                    run(flash, threads, k)
    sys.exit(0)
