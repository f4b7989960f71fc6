"""``erllama complete`` and ``erllama info``."""

from __future__ import annotations

import argparse

from ..config import CacheConfig, EngineConfig
from ..engine import open_engine
from ._common import load, ms, sampler_args, stream_reply
from ._console import Console

__all__ = ["NO_CACHE", "complete", "info"]

#: No cache at all: a one-shot command has nothing to reuse, and leaves nothing behind.
NO_CACHE = EngineConfig(cache=CacheConfig(enabled=False, ram_file_dir=None))


async def complete(args: argparse.Namespace, console: Console) -> int:
    async with open_engine(NO_CACHE) as engine:
        mid = await load(engine, args, progress=console.interactive)
        _, done = await stream_reply(engine, mid, args.prompt, console, **sampler_args(args))
        st = done.stats
        console.note(
            f"[{done.finish_reason}: {st.completion_tokens} tokens, "
            f"ttft {ms(st.time_to_first_token_s)}, {st.tokens_per_s or 0:.1f} tok/s]"
        )
    return 0


async def info(args: argparse.Namespace, console: Console) -> int:
    async with open_engine(NO_CACHE) as engine:
        mid = await load(engine, args, progress=console.interactive)
        model = engine.model_info(mid)
        for field in ("id", "backend", "model_path", "quant", "n_ctx", "n_vocab", "fingerprint"):
            console.out.line(f"{field:>14}: {getattr(model, field)}")
        console.out.line(f"{'capabilities':>14}: {', '.join(sorted(model.capabilities))}")
        for k, v in model.metadata.items():
            console.out.line(f"{k:>14}: {v}")
    return 0
