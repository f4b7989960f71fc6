"""``backend="parrot"``: the smallest useful erllama backend plugin (required hooks only)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from erllama.backends import Decode, LoadedModel, Prefill, Prefilled, Sampled, StepOp, hookimpl
from erllama.config import ModelConfig

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
N_VOCAB = 256 + OFFSET


class ParrotModel:
    def __init__(self, n_ctx: int, n_seq: int) -> None:
        self.n_ctx = n_ctx
        self.seqs: dict[int, list[int]] = {s: [] for s in range(n_seq)}
        self.ready: dict[int, bool] = dict.fromkeys(range(n_seq), False)


@hookimpl
def load(config: ModelConfig) -> LoadedModel:
    model = ParrotModel(config.n_ctx, config.n_seq_max)
    return LoadedModel(
        handle=model,
        n_ctx=config.n_ctx,
        n_vocab=N_VOCAB,
        n_seq_max=config.n_seq_max,
        quant="f32",
        kv_layout={"backend": "parrot", "version": "0.1.0", "n_ctx": config.n_ctx},
        eog_tokens=frozenset({EOS}),
    )


@hookimpl
def free(model: ParrotModel) -> None:
    model.seqs.clear()


@hookimpl
def tokenize(model: ParrotModel, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return ([BOS] if add_special else []) + [b + OFFSET for b in text.encode("utf-8")]


@hookimpl
def detokenize(model: ParrotModel, tokens: Sequence[int]) -> bytes:
    return bytes(t - OFFSET for t in tokens if t >= OFFSET)


@hookimpl
def step(model: ParrotModel, ops: Sequence[StepOp]) -> list[Any]:
    out: list[Any] = []
    for op in ops:
        ctx = model.seqs[op.seq]
        if isinstance(op, Prefill):
            if len(ctx) + len(op.tokens) > model.n_ctx:
                raise ValueError("context overflow")
            ctx.extend(op.tokens)
            model.ready[op.seq] = op.logits
            out.append(Prefilled(seq=op.seq, n_tokens=len(op.tokens)))
        elif isinstance(op, Decode):
            if not model.ready[op.seq]:
                raise RuntimeError("decode without logits")
            tok = ctx[len(ctx) // 2]
            if tok < OFFSET:
                tok = EOS
            ctx.append(tok)
            out.append(Sampled(seq=op.seq, token=tok, eog=tok == EOS))
    return out


@hookimpl
def kv_pack(model: ParrotModel, seq: int) -> bytes:
    ctx = model.seqs[seq]
    return struct.pack(f"<I{len(ctx)}H", len(ctx), *ctx)


@hookimpl
def kv_unpack(model: ParrotModel, seq: int, data: bytes | bytearray | memoryview) -> None:
    # File tiers hand a memoryview into a buffer they reuse: struct reads any of the three
    # types in place, and the list below copies the tokens out before the call returns.
    (n,) = struct.unpack_from("<I", data)
    if len(data) != 4 + 2 * n:
        raise ValueError("bad parrot state")
    model.seqs[seq] = list(struct.unpack_from(f"<{n}H", data, 4))
    model.ready[seq] = False


@hookimpl
def seq_rm(model: ParrotModel, seq: int, start: int, end: int | None) -> None:
    ctx = model.seqs[seq]
    del ctx[start : len(ctx) if end is None else end]
    model.ready[seq] = False
