"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``, in the shapes the official ``openai`` package
parses (see docs/server.md for what is not supported)."""

from __future__ import annotations

import base64
import logging
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
    ChatJob,
    End,
    Started,
    Text,
    cancelled_error,
    close,
    extension,
    keep_alive_of,
    pieces,
    reply_unless_disconnected,
    start,
    stream_error,
    stream_guard,
)
from .guard import request_id
from .params import (
    EXTENSION_RENAMES,
    cache_salt,
    extension_options,
    functions_of,
    max_tokens,
    sampling,
    tool_spec,
    unique,
)
from .sse import EventStreamResponse, NoResponse, openai_done, openai_event, unless_disconnected
from .state import ServerState
from .toolcalls import fallback_text

__all__ = ["chat_completions", "completions", "embeddings", "list_models", "get_model"]

log = logging.getLogger("erllama.server")

#: Most inputs one embeddings request may hold.
MAX_EMBED_INPUTS = 256
#: What a legacy completion generates when the request names no max_tokens (OpenAI's own
#: default for this endpoint).
COMPLETION_DEFAULT_TOKENS = 16


def _new_id(prefix: str) -> str:
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

_UNSUPPORTED_CHAT = ("audio", "prediction", "functions", "function_call", "top_logprobs")


def _tools(body: Fields) -> tuple[list[dict[str, Any]] | None, str, str | None]:
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


def _response_format(body: Fields) -> dict[str, Any] | None:
    rf = body.obj("response_format")
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = rf.obj("json_schema", required=True)
        assert spec is not None
        schema = spec.obj("schema", required=True)
        assert schema is not None
        return {"type": "json_schema", "json_schema": {"schema": schema.data}}
    raise rf.bad("type", "must be text, json_object or json_schema")


def _common_unsupported(body: Fields) -> None:
    n = body.integer("n")
    if n is not None and n != 1:
        raise body.bad("n", "only n = 1 is supported")
    if body.get("logprobs") not in (None, False, 0):
        raise body.bad("logprobs", "is not supported")
    if body.get("logit_bias"):
        raise body.bad("logit_bias", "is not supported")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.number(name) not in (None, 0.0):
            raise body.bad(name, "is not supported (erllama takes repetition_penalty)")


def _options(
    request: Request, body: Fields, state: ServerState, names: Sequence[str], default: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
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
    renames = {"max_tokens": field, **EXTENSION_RENAMES}
    return options, renames


def _stream_flags(body: Fields) -> tuple[bool, bool]:
    stream = body.flag("stream")
    opts = body.obj("stream_options")
    include_usage = opts.flag("include_usage") if opts is not None else False
    return stream, include_usage


def _usage(done: Done) -> dict[str, Any]:
    st = done.stats
    return {
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": st.completion_tokens,
        "total_tokens": st.prompt_tokens + st.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": st.cache_delta.read},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = body.req_text("model")
    track = state.metrics.track("openai", state.model_label(model))
    try:
        messages = chat_messages(body, state, model)
        _common_unsupported(body)
        for name in _UNSUPPORTED_CHAT:
            body.refuse(name)
        tools, choice, forced = _tools(body)
        options, renames = _options(
            request, body, state, ("max_completion_tokens", "max_tokens"), None
        )
        stream, include_usage = _stream_flags(body)
        job = ChatJob(
            model=model,
            messages=messages,
            tools=tools,
            functions=functions_of(tools or []),
            choice=choice,  # type: ignore[arg-type]
            forced=forced,
            response_format=_response_format(body),
            options=options,
            renames={"prompt": "messages", "grammar": "response_format", **renames},
        )
        started = await start(state, job, track, request_id(request.scope))
    except BaseException as exc:
        track.end_with(exc)
        raise
    completion_id = _new_id("chatcmpl-")
    created = int(time.time())
    if stream:
        return EventStreamResponse(
            _chat_events(state, started, completion_id, created, include_usage),
            cleanup=lambda why: close(started, why),
            guard=stream_guard(state, "openai"),
        )
    reply = await reply_unless_disconnected(request, state, started, "call_")
    if reply is None:
        return NoResponse()
    assert reply.end is not None
    end = reply.end
    calls = reply.calls
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text if reply.text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = [_call_json(c) for c in calls]
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": [
                {"index": 0, "message": message, "finish_reason": end.finish, "logprobs": None}
            ],
            "usage": _usage(end.done),
            "erllama": extension(end.done),
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
    state: ServerState, started: Started, cid: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    model = started.job.model

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    yield openai_event(chunk({"role": "assistant", "content": ""}))
    n_calls = 0
    try:
        async with aclosing(pieces(state, started, "call_")) as parts:
            async for piece in parts:
                if isinstance(piece, Text):
                    yield openai_event(chunk({"content": piece.text}))
                elif isinstance(piece, Call):
                    yield openai_event(chunk({"tool_calls": [_call_json(piece, n_calls)]}))
                    n_calls += 1
                elif isinstance(piece, End):
                    for event in _end_events(piece, lambda f: chunk({}, f), include_usage):
                        yield event
    except Exception as exc:
        yield openai_event(stream_error(exc, started, "openai"))


def _end_events(
    end: End, chunk: Callable[[str | None], dict[str, Any]], include_usage: bool
) -> list[str]:
    """What closes a streamed reply, chat or legacy: an error for a cancelled request; else
    the last chunk (``chunk(finish)``, with erllama's fields), the usage chunk when asked
    for, and ``[DONE]``."""
    if end.finish == "cancelled":
        return [openai_event(error_body(cancelled_error(), "openai"))]
    last = chunk(end.finish)
    last["erllama"] = extension(end.done)
    out = [openai_event(last)]
    if include_usage:
        usage = chunk(None)
        usage["choices"] = []
        usage["usage"] = _usage(end.done)
        out.append(openai_event(usage))
    out.append(openai_done())
    return out


# ---- legacy completions ------------------------------------------------------------------


def _prompt(body: Fields) -> str | list[int]:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise body.bad("prompt", "must not be empty")
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return list(value)
    if isinstance(value, list) and len(value) > 1:
        raise body.bad("prompt", "one prompt per request is supported")
    raise body.bad("prompt", "must be a non-empty string or array of token ids")


async def completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = body.req_text("model")
    track = state.metrics.track("openai", state.model_label(model))
    try:
        prompt = _prompt(body)
        _common_unsupported(body)
        for name in ("suffix", "echo", "best_of"):
            if name == "best_of" and body.integer("best_of") in (None, 1):
                continue
            if name == "echo" and not body.flag("echo"):
                continue
            body.refuse(name)
        options, renames = _options(
            request, body, state, ("max_tokens",), COMPLETION_DEFAULT_TOKENS
        )
        stream, include_usage = _stream_flags(body)
        keep_alive, options = keep_alive_of(options)
        await state.use_model(model, keep_alive)
        job = ChatJob(model=model, messages=[], options=options, renames=renames)
        try:
            infer = await state.engine.infer(model, prompt, **options)
        except ErllamaError as exc:
            raise from_engine(exc, renames) from exc
        started = Started(
            job=job,
            stream=infer,
            prompt_tokens=0,
            track=track,
            request_id=request_id(request.scope),
        )
    except BaseException as exc:
        track.end_with(exc)
        raise
    completion_id = _new_id("cmpl-")
    created = int(time.time())

    def shape(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if stream:

        async def events() -> AsyncIterator[str]:
            try:
                async with aclosing(pieces(state, started, "call_")) as parts:
                    async for piece in parts:
                        if isinstance(piece, Text):
                            yield openai_event(shape(piece.text, None))
                        elif isinstance(piece, End):
                            for event in _end_events(piece, lambda f: shape("", f), include_usage):
                                yield event
            except Exception as exc:
                yield openai_event(stream_error(exc, started, "openai"))

        return EventStreamResponse(
            events(), cleanup=lambda why: close(started, why), guard=stream_guard(state, "openai")
        )
    reply = await reply_unless_disconnected(request, state, started, "call_")
    if reply is None:
        return NoResponse()
    assert reply.end is not None
    out = shape(reply.text, reply.end.finish)
    out["usage"] = _usage(reply.end.done)
    out["erllama"] = extension(reply.end.done)
    return json_response(out)


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


async def embeddings(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = body.req_text("model")
    inputs = _inputs(body)
    fmt = body.text("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise body.bad("encoding_format", "must be float or base64")
    body.refuse("dimensions")
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
        value: Any = vec
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
