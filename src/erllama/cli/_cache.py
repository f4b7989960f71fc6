"""``erllama cache explain``: why a prompt would (not) be warm, read offline from a cache
directory.

The model and cache are described exactly as ``erllama serve`` describes them (the same
``--config`` file, or the same ``--model``/``--n-ctx``/``--parallel``/``--cache-dir``
options), so the model's cache namespace is the one the server saved its rows under. The
command opens an engine on the cache's file tiers, with budgets it never enforces (nothing
is trimmed) and no RAM tier, loads the model (for its tokenizer and identity), asks
:meth:`~erllama.Engine.explain_prefix`, prints the answer and leaves. It saves nothing; like
any engine opening the directory, it removes damaged row files and stale temporaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from ..config import ModelConfig
from ..engine import open_engine
from ..errors import InvalidRequest
from ..events import CacheExplanation
from ._console import Console
from ._serve import ServeArgumentError, serve_config

__all__ = ["CAUSES", "cache_command", "explain_config"]

#: Budgets the command gives its file tiers: never reached, so opening trims nothing.
UNENFORCED = 1 << 62

#: What each cause means, one line each (the command's output).
CAUSES = {
    "no_row": "nothing this model holds shares a token with the prompt",
    "evicted": "the nearest row was removed from the cache",
    "fingerprint": "a row with more of the prompt was saved under another model file",
    "adapter": "a row with more of the prompt was saved under another adapter set",
    "layout": "a row with more of the prompt was saved under another KV layout or quantisation",
    "diverged": "the prompt differs from the nearest row here",
    "extends": "the prompt runs past the end of the nearest row",
    "grid": "the prompt matched what a finished request computed past the cells it kept "
    "(restores stop at a whole grid cell of a prompt; replies are not kept)",
    "policy": "a row held more, but restoring it was not worth it (CachePolicy.min_tokens)",
    "disabled": "the cache is off",
}


def explain_config(args: argparse.Namespace) -> tuple[Any, str, ModelConfig]:
    """The serve config the options describe, the model to explain for, and its config.
    ServeArgumentError for options that do not fit together."""
    model_id = args.model_id
    if args.config is not None:
        args.model_id = None  # serve_config refuses it with --config; here it picks one
    config = serve_config(args)
    if args.config is None:
        (model_id,) = config.models
    elif model_id is None:
        if len(config.models) != 1:
            names = ", ".join(sorted(config.models)) or "none"
            raise ServeArgumentError(f"--model-id: the config names several models ({names})")
        (model_id,) = config.models
    elif model_id not in config.models:
        names = ", ".join(sorted(config.models)) or "none"
        raise ServeArgumentError(f"--model-id {model_id}: not in the config (it has {names})")
    return config, model_id, config.models[model_id]


async def cache_command(args: argparse.Namespace, console: Console) -> int:
    """``erllama cache explain``."""
    config, model_id, model = args.explain_config
    cache = attrs.evolve(
        config.cache,
        ram_bytes=0,
        ram_file_bytes=UNENFORCED,
        disk_bytes=UNENFORCED,
        sweep_interval_s=1e9,
    )
    engine_config = attrs.evolve(config.engine_config(), cache=cache, models={}, preload=())
    async with open_engine(engine_config) as engine:
        mid = await engine.load_model(model_id, model)
        prompt: str | list[int]
        if args.messages is not None:
            prompt = await engine.apply_chat_template(mid, _messages(args.messages))
        elif args.tokens:
            prompt = _ids(args.prompt)
        else:
            prompt = args.prompt
        ex = await engine.explain_prefix(mid, prompt, cache_salt=_salt(args))
    if args.json:
        console.out.line(json.dumps(attrs.asdict(ex)))
    else:
        for line in describe(ex):
            console.out.line(line)
    return 0


def describe(ex: CacheExplanation) -> list[str]:
    """The explanation as lines of text."""
    where = f" from {ex.tier}" if ex.tier else ""
    lines = [
        f"{'prompt':>9}: {ex.prompt_tokens} tokens",
        f"{'restored':>9}: {ex.restored} tokens{where} (grid {ex.grid})",
        f"{'matched':>9}: {ex.matched} tokens",
    ]
    if ex.cause is None:
        lines.append(f"{'cause':>9}: none, the whole prompt matched")
        return lines
    at = f" at token {ex.position}" if ex.position is not None else ""
    lines.append(f"{'cause':>9}: {ex.cause}{at}: {CAUSES[ex.cause]}")
    if ex.row_key is not None:
        lines.append(f"{'row':>9}: {ex.row_key} ({ex.row_tokens} tokens, {ex.row_tier})")
    if ex.evicted_at is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ex.evicted_at))
        lines.append(f"{'removed':>9}: {stamp} ({ex.evicted_because})")
    if ex.row_fingerprint is not None:
        lines.append(f"{'saved by':>9}: fingerprint {ex.row_fingerprint}")
    if ex.position is not None:
        lines.append(f"{'shared':>9}: {ex.shared_text!r}")
        lines.append(f"{'prompt':>9}: {ex.prompt_text!r} {list(ex.prompt_ids)}")
        lines.append(f"{'row':>9}: {ex.row_text!r} {list(ex.row_ids)}")
    return lines


def _salt(args: argparse.Namespace) -> str | None:
    """The salt the server gives a request: its API key's, then the request's own."""
    from ..server.state import key_salt

    parts = [key_salt(args.key)] if args.key else []
    if args.cache_salt:
        parts.append(args.cache_salt)
    return "\x1f".join(parts) if parts else None


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InvalidRequest("prompt", "with --tokens, token ids separated by spaces") from None


def _messages(path: str) -> list[dict[str, Any]]:
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest("messages", f"cannot read {path}: {exc.strerror}") from None
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest("messages", f"not JSON: {exc}") from None
    if isinstance(messages, dict):
        messages = messages.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages", "a JSON list of messages, or an object with one")
    return messages
