"""Admin routes: list, load and unload models (behind the API key when one is set).

Nothing in a request reaches the filesystem on its own say: a load names a model the config
defines, or a GGUF file the config allows (``server.models_dir``, ``server.model_paths``,
or a file a configured model was loaded from), symbolic links resolved first. Backend
``options`` (which may name files) cannot be set over HTTP, and the backend must be one of
``server.admin_backends``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..config import ModelConfig, structure_config
from ..errors import ModelAlreadyLoaded
from ..events import ModelInfo
from .body import Fields, read_json
from .errors import ApiError, json_response
from .openai import lifecycle_facts
from .state import ServerState

__all__ = ["allowed_model_path", "list_models", "load_model", "unload_model"]

MODEL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _info(m: ModelInfo) -> dict[str, Any]:
    hit = m.last_cache_hit
    return {
        "id": m.id,
        "backend": m.backend,
        "status": m.status,
        "model_path": m.model_path,
        "n_ctx": m.n_ctx,
        "n_seq_max": m.n_seq_max,
        "queue_len": m.queue_len,
        "running": m.running,
        "fingerprint": m.fingerprint,
        "quant": m.quant,
        "capabilities": sorted(m.capabilities),
        "last_cache_hit": None if hit is None else {"kind": hit.kind, "tokens": hit.prefix_len},
        "error": m.error,
    }


async def list_models(request: Request, state: ServerState) -> Response:
    return json_response(
        {
            "models": [_info(m) for m in state.engine.list_models()],
            "loading": sorted(state.loading),
            "configured": sorted(state.config.models),
            "lifecycle": [
                {"id": m.id, **lifecycle_facts(m), "loads": m.loads, "unloads": dict(m.unloads)}
                for m in state.engine.model_states()
            ],
        }
    )


def _forbidden(reason: str) -> ApiError:
    return ApiError(403, "permission", f"model_path: {reason}", param="model_path")


def allowed_model_path(state: ServerState, raw: object) -> Path:
    """``raw`` as a resolved path the config allows; 400/403 otherwise."""
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise ApiError.bad_param("model_path", "must be a non-empty path")
    server = state.config.server
    path = Path(raw)
    if not path.is_absolute():
        if server.models_dir is None:
            raise _forbidden("relative paths need server.models_dir")
        path = server.models_dir / path
    try:
        resolved = path.resolve()
        allowed = {c.model_path.resolve() for c in state.config.models.values() if c.model_path}
        allowed.update(p.resolve() for p in server.model_paths)
        folder = server.models_dir.resolve() if server.models_dir is not None else None
    except (OSError, RuntimeError):  # a symlink loop
        raise _forbidden("cannot be resolved") from None
    if resolved in allowed:
        return resolved
    if folder is not None and resolved.is_relative_to(folder) and resolved.suffix == ".gguf":
        return resolved
    raise _forbidden("not a file this server may load (see server.models_dir)")


def _model_config(state: ServerState, body: Fields, model_id: str) -> ModelConfig:
    fields = {k: v for k, v in body.data.items() if k != "id"}
    configured = state.config.models.get(model_id)
    if not fields and configured is not None:
        return configured
    if "options" in fields:
        raise body.bad("options", "backend options cannot be set over HTTP")
    backend = fields.get("backend", "llama_cpp")
    if backend not in state.config.server.admin_backends:
        allowed = ", ".join(state.config.server.admin_backends)
        raise body.bad("backend", f"must be one of: {allowed}")
    if "model_path" in fields:
        fields["model_path"] = str(allowed_model_path(state, fields["model_path"]))
    return structure_config(fields, ModelConfig)


async def load_model(request: Request, state: ServerState) -> Response:
    """``POST /admin/models {"id": ..., "model_path": ..., <ModelConfig fields>}``; just
    ``{"id"}`` reloads a model the config defines."""
    body = await read_json(request, state.config.server.max_body_bytes)
    model_id = body.req_text("id")
    if not MODEL_ID_RE.fullmatch(model_id):
        raise body.bad("id", "must be 1 to 128 letters, digits, '.', '_', ':' or '-'")
    if model_id in state.loading:
        raise ModelAlreadyLoaded(model_id)
    config = _model_config(state, body, model_id)
    state.loading.add(model_id)
    try:
        await state.engine.load_model(model_id, config)
    finally:
        state.loading.discard(model_id)
    state.model_configs[model_id] = config
    return json_response(_info(state.engine.model_info(model_id)), 201)


async def unload_model(request: Request, state: ServerState) -> Response:
    model_id = request.path_params["model_id"]
    loading = any(m.id == model_id and m.state == "loading" for m in state.engine.model_states())
    if model_id in state.loading or loading:
        raise ApiError(409, "conflict", f"model {model_id!r} is loading", param="model_id")
    await state.engine.unload(model_id)
    if model_id not in state.config.models:
        state.model_configs.pop(model_id, None)
    return json_response({"id": model_id, "unloaded": True})
