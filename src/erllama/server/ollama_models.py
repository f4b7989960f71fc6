"""Ollama's model routes: ``/api/tags``, ``/api/ps``, ``/api/show`` and ``/api/version``.

Ollama names models ``name:tag``; a model's id here gets the default tag (``smollm2`` is
listed as ``smollm2:latest``), and requests may use either name (ollama.py resolves them).
What Ollama reads from a model's files comes from the engine's snapshot of it: its
fingerprint as the digest, the GGUF metadata the backend reports, the loaded context.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..events import ModelInfo
from ..lifecycle import KeepAlive
from .body import read_json
from .errors import json_response
from .ollama import request_model
from .state import ServerState

__all__ = ["OLLAMA_VERSION", "ps", "show", "tags", "version"]

#: The Ollama API version these routes follow (``/api/version``; clients check it for
#: features such as ``think`` and structured outputs).
OLLAMA_VERSION = "0.12.0"
#: A model kept loaded for good expires at the end of time (``/api/ps``).
NEVER = "2318-01-01T00:00:00Z"


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tagged(model_id: str) -> str:
    """A model id as Ollama names models: ``name:tag`` (``:latest`` when it has none)."""
    return model_id if ":" in model_id else model_id + ":latest"


def _parameter_size(n_params: str | None) -> str:
    try:
        n = int(n_params or "")
    except ValueError:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _details(info: ModelInfo) -> dict[str, Any]:
    family = info.metadata.get("architecture", info.backend)
    path = info.model_path or ""
    return {
        "parent_model": "",
        "format": "gguf" if path.endswith(".gguf") else info.backend,
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(info.metadata.get("n_params")),
        "quantization_level": info.quant,
    }


def _file(info: ModelInfo, started: int) -> tuple[int, str]:
    return _file_at(info.model_path, started)


def _file_at(path: str | None, started: int) -> tuple[int, str]:
    """The model file's size and modification time (0 and the server's start when it
    cannot be read here, as for a Ray replica's file)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    if st is None:
        return 0, _stamp(started)
    return st.st_size, _stamp(st.st_mtime)


def _entry(info: ModelInfo, started: int) -> dict[str, Any]:
    size, modified = _file(info, started)
    name = _tagged(info.id)
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": size,
        "digest": info.fingerprint,
        "details": _details(info),
    }


def _config_entry(state: ServerState, model_id: str) -> dict[str, Any]:
    """A model never loaded yet: what its config says (no digest or details before its
    first load)."""
    config = state.model_configs.get(model_id) or state.config.models.get(model_id)
    path = str(config.model_path) if config is not None and config.model_path else None
    size, modified = _file_at(path, state.started)
    name = _tagged(model_id)
    backend = config.backend if config is not None else ""
    details = {
        "parent_model": "",
        "format": "gguf" if (path or "").endswith(".gguf") else backend,
        "family": "",
        "families": [],
        "parameter_size": "",
        "quantization_level": "",
    }
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": size,
        "digest": "",
        "details": details,
    }


async def tags(request: Request, state: ServerState) -> Response:
    """Every model the server may serve, loaded or not (Ollama lists what it has)."""
    infos = {m.id: m.info for m in state.engine.model_states()}
    for m in state.engine.list_models():
        infos.setdefault(m.id, m)
    out = []
    for model_id in state.known_models():
        info = infos.get(model_id)
        out.append(
            _entry(info, state.started) if info is not None else _config_entry(state, model_id)
        )
    return json_response({"models": out})


async def ps(request: Request, state: ServerState) -> Response:
    """The loaded models, with when each unloads if it stays idle (its keep-alive, from
    its last use)."""
    lifecycle = {m.id: m for m in state.engine.model_states()}
    models = []
    for info in state.engine.list_models():
        if info.status in ("loading", "unloading"):
            continue
        entry = _entry(info, state.started)
        del entry["modified_at"]
        known = lifecycle.get(info.id)
        expires = _stamp(known.expires_at) if known and known.expires_at is not None else NEVER
        # erllama does not measure what a model holds on the GPU.
        entry.update({"expires_at": expires, "size_vram": 0, "context_length": info.n_ctx})
        models.append(entry)
    return json_response({"models": models})


def _capabilities(state: ServerState, info: ModelInfo) -> list[str]:
    out = ["completion", "tools"]  # every chat model gets tool-call markers
    if info.thinking_markers is not None:
        out.append("thinking")
    config = state.model_configs.get(info.id)
    if "embed" in info.capabilities and (config is None or config.embeddings):
        out.append("embedding")
    return out


async def show(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    _name, model = request_model(body, state)
    # What the model was when last loaded; one never loaded yet is loaded to be shown.
    last = next((m.info for m in state.engine.model_states() if m.id == model), None)
    if last is None or last.status == "failed":
        await state.use_model(model, KeepAlive.UNCHANGED)
        last = state.engine.model_info(model)
    info = last
    meta = info.metadata
    arch = meta.get("architecture", info.backend)
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": info.n_ctx,
    }
    if meta.get("name"):
        model_info["general.name"] = meta["name"]
    numbers = (
        ("n_params", "general.parameter_count"),
        ("n_embd", f"{arch}.embedding_length"),
        ("n_layer", f"{arch}.block_count"),
    )
    for key, field in numbers:
        if meta.get(key, "").isdigit():
            model_info[field] = int(meta[key])
    size, modified = _file(info, state.started)
    return json_response(
        {
            "license": "",
            "modelfile": f"# served by erllama from {info.model_path or info.backend}\n",
            "parameters": "",
            "template": "",
            "details": _details(info),
            "model_info": model_info,
            "capabilities": _capabilities(state, info),
            "modified_at": modified,
            "size": size,
        }
    )


async def version(request: Request, state: ServerState) -> Response:
    return json_response({"version": OLLAMA_VERSION})
