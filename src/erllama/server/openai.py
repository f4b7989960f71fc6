"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``, in the shapes the official ``openai`` package
parses (see docs/server.md for what is not supported)."""

from __future__ import annotations

import base64
import logging
import math
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from ..events import Done, ModelState
from .body import Fields, read_json
from .errors import ApiError, error_body, from_engine, json_response
from .generation import (
    Call,
    CallArguments,
    CallStart,
    ChatJob,
    End,
    Started,
    Text,
    cancelled_error,
    close_all,
    extension,
    pieces,
    replies_unless_disconnected,
    start_choices,
    stream_error,
    stream_guard,
)
from .guard import request_id
from .logprobs import chat_logprobs, chat_request
from .params import (
    EXTENSION_RENAMES,
    cache_salt,
    explain_cache,
    extension_options,
    functions_of,
    max_tokens,
    sampling,
    sampling_renames,
    tool_spec,
    unique,
)
from .sse import EventStreamResponse, NoResponse, openai_done, openai_event, unless_disconnected
from .state import ServerState
from .structured import constraint
from .toolcalls import fallback_text

__all__ = [
    "MAX_CHOICES",
    "chat_completions",
    "chat_messages",
    "choices_of",
    "closing_events",
    "embeddings",
    "get_model",
    "list_models",
    "new_id",
    "options_of",
    "stream_flags",
    "tools_of",
    "unit_length",
    "usage_of",
]

log = logging.getLogger("erllama.server")

#: Most inputs one embeddings request may hold.
MAX_EMBED_INPUTS = 256


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ---- models ----------------------------------------------------------------------------


def model_entry(model_id: str, created: int, model: ModelState | None = None) -> dict[str, Any]:
    """One model, in a shape both SDKs parse (OpenAI's fields and Anthropic's), with its
    lifecycle when the engine knows it: llama-server's ``status.value`` (``loaded``,
    ``loading``, ``unloaded`` ...) and erllama's own facts (keep-alive, last use, expiry)."""
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "erllama",
        "type": "model",
        "display_name": model_id,
        "created_at": stamp,
    }
    if model is not None:
        entry["status"] = {"value": model.state}
        if model.state == "failed":
            entry["status"]["failed"] = True
        entry["erllama"] = lifecycle_facts(model)
    return entry


def lifecycle_facts(model: ModelState) -> dict[str, Any]:
    """A model's lifecycle as the ``erllama`` field of the model routes (Unix times)."""
    return {
        "state": model.state,
        "keep_alive_s": model.keep_alive_s,
        "last_used_at": model.last_used_at,
        "expires_at": model.expires_at,
        "loaded_at": model.loaded_at,
        "last_error": model.last_error,
    }


def _models(state: ServerState) -> dict[str, ModelState | None]:
    """Every model the server may serve, in the engine's order, with its lifecycle."""
    known: dict[str, ModelState | None] = {m.id: m for m in state.engine.model_states()}
    for model_id in state.known_models():
        known.setdefault(model_id, None)
    return known


async def list_models(request: Request, state: ServerState) -> Response:
    models = _models(state)
    ids = list(models)
    return json_response(
        {
            "object": "list",
            "data": [model_entry(i, state.started, models[i]) for i in ids],
            "has_more": False,
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
        }
    )


async def get_model(request: Request, state: ServerState) -> Response:
    """A model the server knows, loaded or not (asking does not load it)."""
    model_id = request.path_params["model_id"]
    models = _models(state)
    if model_id not in models:
        state.check_model(model_id)  # the 404
    return json_response(model_entry(model_id, state.started, models.get(model_id)))


# ---- chat messages -----------------------------------------------------------------------


def _content(f: Fields, *, optional: bool = False) -> str | None:
    """A message's content: a string or an array of text parts (joined by newlines)."""
    value = f.get("content")
    if value is None:
        if optional:
            return None
        raise f.bad("content", "is required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise f.bad("content", "must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(value):
        p = f.item("content", j, part)
        kind = p.get("type")
        if kind == "text":
            texts.append(p.text("text", required=True) or "")
        elif kind == "refusal":
            texts.append(p.text("refusal") or "")
        else:
            raise p.bad("type", f"only text parts are supported, got {kind!r}")
    return "\n".join(texts)


def _assistant(f: Fields, state: ServerState, model: str) -> str:
    """An assistant message's text; with tool calls, the exact reply they came from when
    the server made them, else the fallback rendering."""
    content = _content(f, optional=True) or ""
    raw_calls = f.array("tool_calls")
    if not raw_calls:
        return content
    ids, rendered = [], []
    markers = state.markers(model)
    for k, raw in enumerate(raw_calls):
        call = f.item("tool_calls", k, raw)
        ids.append(call.req_text("id"))
        fn = call.obj("function", required=True)
        assert fn is not None
        arguments = fn.text("arguments") or "{}"
        rendered.append(fallback_text(markers, fn.req_text("name"), arguments))
    exact = state.store.reply_for(model, ids)
    return exact if exact is not None else content + "".join(rendered)


def chat_messages(body: Fields, state: ServerState, model: str) -> list[dict[str, str]]:
    raw = body.array("messages", required=True, empty=False)
    assert raw is not None
    out = []
    for i, value in enumerate(raw):
        m = body.item("messages", i, value)
        role = m.req_text("role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _content(m) or ""})
        elif role == "user":
            out.append({"role": "user", "content": _content(m) or ""})
        elif role == "assistant":
            out.append({"role": "assistant", "content": _assistant(m, state, model)})
        elif role == "tool":
            out.append({"role": "tool", "content": _content(m) or ""})
        else:
            raise m.bad("role", f"must be system, developer, user, assistant or tool, got {role!r}")
    return out


# ---- chat request ------------------------------------------------------------------------

_UNSUPPORTED_CHAT = ("audio", "prediction", "functions", "function_call")
#: Most choices one request may ask for (``n``): each is a request in the model's queue.
MAX_CHOICES = 16


def tools_of(body: Fields) -> tuple[list[dict[str, Any]] | None, str, str | None]:
    """``tools`` and ``tool_choice``: the tools, the choice, and the forced function."""
    raw = body.array("tools")
    tools = []
    for i, value in enumerate(raw or []):
        t = body.item("tools", i, value)
        if t.get("type") != "function":
            raise t.bad("type", "only function tools are supported")
        fn = t.obj("function", required=True)
        assert fn is not None
        tools.append(tool_spec(fn, "name", "description", "parameters")[1])
    unique([t["function"]["name"] for t in tools], "tools")
    choice = body.get("tool_choice")
    if choice is None:
        return (tools or None), ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise body.bad("tool_choice", "must be none, auto, required or a named function")
        if choice != "none" and not tools:
            raise body.bad("tool_choice", f"{choice!r} needs tools")
        return (tools or None), choice, None
    c = body.obj("tool_choice")
    assert c is not None
    if c.get("type") != "function":
        raise c.bad("type", "only 'function' is supported")
    fn = c.obj("function", required=True)
    assert fn is not None
    name = fn.req_text("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise fn.bad("name", f"no tool named {name!r}")
    return tools, "required", name


def choices_of(body: Fields) -> int:
    """``n``: how many choices (1 to :data:`MAX_CHOICES`)."""
    return body.integer("n", minimum=1, maximum=MAX_CHOICES) or 1


def options_of(
    request: Request, body: Fields, state: ServerState, names: Sequence[str], default: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine keywords both OpenAI generation routes take, and the request's names
    for them (for errors)."""
    limit, field = max_tokens(body, state, names, default)
    options = {
        "max_tokens": limit,
        **sampling(body, state),
        **extension_options(body),
        **cache_salt(body, request.scope),
    }
    stop = body.strings("stop")
    if stop:
        options["stop"] = stop
    renames = {"max_tokens": field, **EXTENSION_RENAMES, **sampling_renames(body)}
    return options, renames


def stream_flags(body: Fields) -> tuple[bool, bool]:
    stream = body.flag("stream")
    opts = body.obj("stream_options")
    include_usage = opts.flag("include_usage") if opts is not None else False
    return stream, include_usage


def usage_of(dones: Sequence[Done]) -> dict[str, Any]:
    """``usage`` of a request's choices: the prompt counted once (it is one prompt, and
    its cached tokens are the first choice's), every choice's generated tokens."""
    first = dones[0].stats
    generated = sum(d.stats.completion_tokens for d in dones)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": first.prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": first.cache_delta.read},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = state.model_of(body)
    track = state.metrics.track("openai", state.model_label(model))
    try:
        messages = chat_messages(body, state, model)
        for name in _UNSUPPORTED_CHAT:
            body.refuse(name)
        body.refuse("web_search_options", "is not supported (no hosted search here)")
        modalities = body.strings("modalities")
        if modalities and set(modalities) != {"text"}:
            raise body.bad("modalities", "only text is supported")
        n = choices_of(body)
        tools, choice, forced = tools_of(body)
        options, renames = options_of(
            request, body, state, ("max_completion_tokens", "max_tokens"), None
        )
        logprobs = chat_request(body)
        if logprobs is not None:
            options["logprobs"] = logprobs
            renames["logprobs"] = "top_logprobs"
        stream, include_usage = stream_flags(body)
        shape = constraint(body)
        job = ChatJob(
            explain_cache=explain_cache(body),
            model=model,
            messages=messages,
            tools=tools,
            functions=functions_of(tools or []),
            choice=choice,  # type: ignore[arg-type]
            forced=forced,
            response_format=shape.response_format,
            grammar=shape.grammar,
            options=options,
            renames={"prompt": "messages", "grammar": shape.field, **renames},
        )
        started = await start_choices(state, job, track, request_id(request.scope), n)
    except BaseException as exc:
        track.end_with(exc)
        raise
    completion_id = new_id("chatcmpl-")
    created = int(time.time())
    with_logprobs = logprobs is not None
    if stream:
        return EventStreamResponse(
            _chat_events(state, started, completion_id, created, include_usage, with_logprobs),
            cleanup=lambda why: close_all(started, why),
            guard=stream_guard(state, "openai"),
        )
    replies = await replies_unless_disconnected(request, state, started, "call_")
    if replies is None:
        return NoResponse()
    choices = []
    for i, reply in enumerate(replies):
        assert reply.end is not None
        calls = reply.calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = [_call_json(c) for c in calls]
        entry: dict[str, Any] = {
            "index": i,
            "message": message,
            "finish_reason": reply.end.finish,
            "logprobs": chat_logprobs(reply.logprobs) if with_logprobs else None,
        }
        if len(replies) > 1:
            entry["erllama"] = extension(reply.end.done)
        choices.append(entry)
    dones = [r.end.done for r in replies if r.end is not None]
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": choices,
            "usage": usage_of(dones),
            "erllama": extension(dones[0]),
        }
    )


def _call_json(call: Call, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    if index is not None:
        out = {"index": index, **out}
    return out


async def _chat_events(
    state: ServerState,
    started: Sequence[Started],
    cid: str,
    created: int,
    include_usage: bool,
    with_logprobs: bool,
) -> AsyncIterator[str]:
    """A chat stream. With several choices (``n``) each choice's chunks come in turn:
    the requests run together in the model, and a later choice's events wait, buffered,
    until the one before ends (clients gather chunks by ``index``)."""
    model = started[0].job.model

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    dones: list[Done] = []
    for one in started:
        i = one.index
        yield openai_event(chunk(i, {"role": "assistant", "content": ""}))
        n_calls = 0
        try:
            async with aclosing(pieces(state, one, "call_", stream_calls=True)) as parts:
                async for piece in parts:
                    if isinstance(piece, Text):
                        event = chunk(i, {"content": piece.text})
                        if with_logprobs:
                            event["choices"][0]["logprobs"] = chat_logprobs(piece.logprobs)
                        yield openai_event(event)
                    elif isinstance(piece, CallStart):
                        # OpenAI's shape: the first delta names the call, with empty
                        # arguments; the arguments follow as they are written.
                        call = {"index": n_calls, "id": piece.id, "type": "function"}
                        call["function"] = {"name": piece.name, "arguments": ""}
                        yield openai_event(chunk(i, {"tool_calls": [call]}))
                    elif isinstance(piece, CallArguments):
                        delta = {"index": n_calls, "function": {"arguments": piece.text}}
                        yield openai_event(chunk(i, {"tool_calls": [delta]}))
                    elif isinstance(piece, Call):
                        if not piece.streamed:
                            whole = _call_json(piece, n_calls)
                            yield openai_event(chunk(i, {"tool_calls": [whole]}))
                        n_calls += 1
                    elif isinstance(piece, End):
                        if piece.finish == "cancelled":
                            yield openai_event(error_body(cancelled_error(), "openai"))
                            return
                        last = chunk(i, {}, piece.finish)
                        last["erllama"] = extension(piece.done)
                        yield openai_event(last)
                        dones.append(piece.done)
        except Exception as exc:
            yield openai_event(stream_error(exc, one, "openai"))
            return
    for closing in closing_events(dones, lambda: chunk(0, {}), include_usage):
        yield closing


def closing_events(
    dones: Sequence[Done], chunk: Callable[[], dict[str, Any]], include_usage: bool
) -> list[str]:
    """What ends a streamed reply, chat or legacy, after every choice's last chunk: the
    usage chunk when asked for (``choices: []``), and ``[DONE]``."""
    out = []
    if include_usage:
        usage = chunk()
        usage["choices"] = []
        usage["usage"] = usage_of(dones)
        out.append(openai_event(usage))
    out.append(openai_done())
    return out


# ---- embeddings ----------------------------------------------------------------------------


def _inputs(body: Fields) -> list[str | list[int]]:
    value = body.get("input")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise body.bad("input", "must be a string, an array of strings or of token-id arrays")
    if len(items) > MAX_EMBED_INPUTS:
        raise body.bad("input", f"at most {MAX_EMBED_INPUTS} inputs per request")
    for i, item in enumerate(items):
        ok_text = isinstance(item, str) and item
        ok_ids = (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        )
        if not (ok_text or ok_ids):
            raise ApiError.bad_param(
                f"input[{i}]", "must be a non-empty string or array of token ids"
            )
    return items


def unit_length(vec: list[float]) -> list[float]:
    """``vec`` scaled to Euclidean length 1 (OpenAI's and llama-server's vectors are, so
    a dot product is their cosine); a zero vector as it is."""
    norm = math.sqrt(math.fsum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else vec


async def embeddings(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = state.model_of(body)
    inputs = _inputs(body)
    fmt = body.text("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise body.bad("encoding_format", "must be float or base64")
    body.refuse("dimensions", "is not supported: vectors keep the model's own size (leave it out)")
    normalize = body.integer("embd_normalize")  # llama-server's: -1 raw, 2 unit length
    if normalize not in (None, -1, 2):
        raise body.bad("embd_normalize", "must be 2 (unit length, the default) or -1 (raw)")
    await state.use_model(model)
    engine = state.engine

    async def work() -> tuple[list[list[float]], int]:
        vectors, n_tokens = [], 0
        for item in inputs:
            ids = await engine.tokenize(model, item) if isinstance(item, str) else item
            n_tokens += len(ids)
            vectors.append(await engine.embed(model, ids))
        return vectors, n_tokens

    try:
        result = await unless_disconnected(request, work)
    except ErllamaError as exc:
        raise from_engine(exc, {"prompt": "input", "tokens": "input"}) from exc
    if result is None:
        return NoResponse()
    vectors, n_tokens = result
    data = []
    for i, vec in enumerate(vectors):
        value: Any = vec if normalize == -1 else unit_length(vec)
        if fmt == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": value})
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
    )
