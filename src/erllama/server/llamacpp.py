"""llama-server's own text routes: ``/tokenize``, ``/detokenize`` and ``/apply-template``,
in its shapes, so clients and scripts written against llama.cpp's server work unchanged.

llama-server serves one model and its requests name none. Here a request may name one
(``model``); without a name, the one model this server has, or ``server.default_model``.
Special tokens (a chat template's markers) are text in both directions, as llama-server
has them: ``/tokenize`` parses them, ``/detokenize`` and ``/apply-template`` write them.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from .body import Fields, read_json
from .errors import ApiError, from_engine, json_response
from .openai import chat_messages, tools_of
from .params import check_messages
from .state import ServerState

__all__ = ["apply_template", "detokenize", "tokenize"]

#: Most tokens ``/tokenize`` lists with their pieces (each piece is a call of its own).
MAX_PIECES = 4096


async def _model(body: Fields, state: ServerState) -> str:
    """The named model, else the only one, else ``server.default_model``; loaded first if
    it is not."""
    if body.get("model") is not None or state.config.server.default_model is not None:
        model = state.model_of(body)
    else:
        models = [m.id for m in state.engine.list_models()]
        if len(models) != 1:
            raise body.bad("model", "is required: this server has more than one model")
        model = models[0]
    await state.use_model(model)
    return model


async def tokenize(request: Request, state: ServerState) -> Response:
    """``{"content", "add_special"?, "parse_special"?, "with_pieces"?}`` -> ``{"tokens"}``
    (with pieces: ``[{"id", "piece"}]``, a piece that is part of a character shows
    U+FFFD)."""
    body = await read_json(request, state.config.server.max_body_bytes)
    model = await _model(body, state)
    content = body.text("content", required=True)
    assert content is not None
    add_special = body.flag("add_special", default=False)
    parse_special = body.flag("parse_special", default=True)
    with_pieces = body.flag("with_pieces")
    engine = state.engine
    try:
        ids = (
            await engine.tokenize(
                model, content, add_special=add_special, parse_special=parse_special
            )
            if content
            else []
        )
        if not with_pieces:
            return json_response({"tokens": ids})
        if len(ids) > MAX_PIECES:
            raise body.bad("with_pieces", f"at most {MAX_PIECES} tokens are listed with pieces")
        pieces = [await engine.detokenize(model, [t], special=True) for t in ids]
    except ErllamaError as exc:
        raise from_engine(exc, {"text": "content"}) from exc
    return json_response(
        {"tokens": [{"id": t, "piece": p} for t, p in zip(ids, pieces, strict=True)]}
    )


async def detokenize(request: Request, state: ServerState) -> Response:
    """``{"tokens": [ids]}`` -> ``{"content"}``."""
    body = await read_json(request, state.config.server.max_body_bytes)
    model = await _model(body, state)
    tokens = body.array("tokens", required=True)
    assert tokens is not None
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ApiError.bad_param(f"tokens[{i}]", "must be a token id")
    try:
        text = await state.engine.detokenize(model, tokens, special=True) if tokens else ""
    except ErllamaError as exc:
        raise from_engine(exc) from exc
    return json_response({"content": text})


async def apply_template(request: Request, state: ServerState) -> Response:
    """``{"messages", "tools"?}`` (OpenAI's chat shapes) -> ``{"prompt"}``: the text the
    model's chat template makes of them, ready for ``/v1/completions``."""
    body = await read_json(request, state.config.server.max_body_bytes)
    model = await _model(body, state)
    messages = chat_messages(body, state, model)
    check_messages(messages, state)
    tools = tools_of(body)[0]
    engine = state.engine
    try:
        ids = await engine.apply_chat_template(model, messages, None, tools)
        prompt: Any = await engine.detokenize(model, ids, special=True)
    except ErllamaError as exc:
        raise from_engine(exc, {"prompt": "messages"}) from exc
    return json_response({"prompt": prompt})
