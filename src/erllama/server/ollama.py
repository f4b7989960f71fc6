"""The Ollama-compatible generation routes: ``/api/chat``, ``/api/generate``, ``/api/embed``
and ``/api/embeddings``, in the shapes the official ``ollama`` clients parse (the model
listings are in ollama_models.py; docs/server.md says what is supported, ignored or
refused).

Ollama streams by default: a request without ``"stream": false`` gets JSON lines
(``application/x-ndjson``), the last one with ``"done": true`` and the request's figures.
Errors are ``{"error": "..."}``, as a status before a stream begins and as a line after.

Ollama's clients do not send tool-call ids back, so a reply's exact text is kept under a
signature of what the client saw (its content, thinking and calls): an assistant message
that comes back unchanged is rendered as the bytes the model generated, and the cached
prefix keeps matching (see toolcalls.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from ..events import Done
from ..lifecycle import KeepAlive
from .body import Fields, read_json
from .chaining import NoContinuation, continuation
from .errors import ApiError, error_body, from_engine, json_response
from .generation import (
    Call,
    ChatJob,
    End,
    Reply,
    Started,
    Text,
    Thinking,
    cancelled_error,
    close,
    extension,
    pieces,
    reply_text,
    reply_unless_disconnected,
    start,
    stream_error,
    stream_guard,
)
from .guard import request_id
from .keepalive import parse_keep_alive
from .params import cache_salt, explain_cache, functions_of, tool_spec, unique
from .sse import NdjsonResponse, ndjson_line, unless_disconnected
from .state import ServerState
from .toolcalls import fallback_text

__all__ = ["chat", "embed", "embeddings", "generate", "request_model", "resolve", "signature"]

#: Ollama's sampling defaults, for options a request leaves out.
DEFAULT_OPTIONS: Mapping[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
#: Load-time options (they shape a model when it is loaded, not a request) and sampler
#: options erllama has no stage for: accepted and ignored, as Ollama ignores options a
#: model does not use.
IGNORED_OPTIONS = frozenset(
    {
        "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
        "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
        "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
        "penalize_newline",
    }
)  # fmt: skip
#: Engine parameter names as this API spells them.
RENAMES: Mapping[str, str] = {
    "prompt": "messages",
    "grammar": "format",
    "response_format": "format",
    "response_format.json_schema.schema": "format",
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_k": "options.top_k",
    "top_p": "options.top_p",
    "min_p": "options.min_p",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "penalty_last_n": "options.repeat_last_n",
    "seed": "options.seed",
    "stop": "options.stop",
    "thinking_budget_tokens": "think",
    "context_limit": "options.num_ctx",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


# ---- names ---------------------------------------------------------------------------------


def resolve(state: ServerState, name: str) -> str:
    """The model id a request's name means: the id itself, or the id without Ollama's
    default ``:latest`` tag."""
    known = set(state.known_models())
    if name not in known and name.endswith(":latest") and name[: -len(":latest")] in known:
        return name[: -len(":latest")]
    return name


def request_model(body: Fields, state: ServerState, field: str = "model") -> tuple[str, str]:
    """The name the request gave (echoed in replies) and the model id it means. Older
    clients send ``name`` instead of ``model``."""
    if body.get(field) is None and body.get("name") is not None:
        field = "name"
    default = state.config.server.default_model
    name = body.req_text(field) if default is None else (body.text(field) or default)
    model = resolve(state, name)
    if default is not None and not state.knows(model):
        model = default  # server.default_model: any name is that model
    return name, model


# ---- request fields ------------------------------------------------------------------------


def _keep_alive(body: Fields) -> float | KeepAlive | None:
    """``keep_alive``, checked, in seconds (None: for good). A request without one gets the
    model's configured ``keep_alive_s`` (what Ollama's server-wide default is to Ollama)."""
    value = body.get("keep_alive")
    if value is None:
        return KeepAlive.DEFAULT
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise body.bad("keep_alive", str(exc)) from None


async def _load_only(
    state: ServerState, name: str, model: str, keep_alive: float | KeepAlive | None, chat: bool
) -> Response:
    """A request without messages (or prompt) loads the model, as in Ollama; with
    ``keep_alive`` 0 it unloads it instead (``done_reason: "unload"``), loading nothing."""
    if keep_alive == 0:
        models = {m.id: m for m in state.engine.model_states()}
        known = models.get(model)
        if known is None and model not in state.known_models():
            state.check_model(model)  # the 404
        if known is None or known.state not in ("loaded", "loading"):
            return _load_reply(name, chat, "unload")
        await state.use_model(model, keep_alive)  # unloaded as soon as this route returns
        return _load_reply(name, chat, "unload")
    await state.use_model(model, keep_alive)
    return _load_reply(name, chat, "load")


def _options(body: Fields, state: ServerState) -> tuple[dict[str, Any], int | None]:
    """``options`` as engine keywords, with Ollama's defaults for the sampling options
    it leaves out; and ``num_ctx``."""
    out: dict[str, Any] = dict(DEFAULT_OPTIONS)
    cap = state.config.server.max_tokens
    out["max_tokens"] = cap
    opts = body.obj("options")
    if opts is None:
        return out, None
    temperature = opts.number("temperature", minimum=0)
    if temperature is not None:
        out["temperature"] = temperature
    renamed = (
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repetition_penalty"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    )
    for name, engine_name in renamed:
        value = opts.number(name)
        if value is not None:
            out[engine_name] = value
    top_k = opts.integer("top_k", minimum=0)
    if top_k is not None:
        out["top_k"] = top_k
    seed = opts.integer("seed")
    if seed is not None and seed >= 0:  # Ollama: a negative seed draws a fresh one
        out["seed"] = seed
    predict = opts.integer("num_predict")
    if predict is not None and predict not in (-1, -2):  # -1: no limit, -2: fill the context
        if predict < 1:
            raise opts.bad("num_predict", f"must be >= 1, -1 or -2, got {predict}")
        if predict > cap:
            raise opts.bad("num_predict", f"must be <= {cap} (this server's cap), got {predict}")
        out["max_tokens"] = predict
    stop = opts.strings("stop")
    if stop:
        out["stop"] = stop
    last_n = opts.integer("repeat_last_n")
    if last_n is not None:
        out["penalty_last_n"] = last_n
    # A loaded model's context is its config's n_ctx; a smaller num_ctx bounds the request
    # (prompt and reply) within it, a larger one cannot apply.
    return out, opts.integer("num_ctx", minimum=1)


def _format(body: Fields) -> dict[str, Any] | None:
    """``format``: ``"json"`` (any JSON object) or a JSON schema, enforced by a grammar."""
    value = body.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is not None and not isinstance(kind, str | list):
            raise body.bad("format", "must be 'json' or a JSON schema")
        return {"type": "json_schema", "json_schema": {"schema": value}}
    raise body.bad("format", "must be 'json' or a JSON schema object")


def _think(body: Fields, state: ServerState, model: str) -> dict[str, Any]:
    """``think``: true (or an effort, ``low`` ... ``high``) runs with thinking, which a
    model without thinking markers cannot do (a 400, as Ollama answers)."""
    value = body.get("think")
    if value is None or value is False:
        return {}
    if value is not True and value not in ("low", "medium", "high"):
        raise body.bad("think", "must be true, false, 'low', 'medium' or 'high'")
    state.check_model(model)
    if state.engine.model_info(model).thinking_markers is None:
        raise body.bad("think", f"model {model!r} does not support thinking")
    return {"thinking": True}


def _no_images(f: Fields) -> None:
    images = f.get("images")
    if images is not None and images != []:
        raise f.bad("images", "images are not supported: erllama serves text models")


def _tools(body: Fields) -> list[dict[str, Any]] | None:
    raw = body.array("tools")
    tools = []
    for i, value in enumerate(raw or []):
        t = body.item("tools", i, value)
        if t.get("type") not in (None, "function"):
            raise t.bad("type", "only function tools are supported")
        fn = t.obj("function", required=True)
        assert fn is not None
        tools.append(tool_spec(fn, "name", "description", "parameters")[1])
    unique([t["function"]["name"] for t in tools], "tools")
    return tools or None


def signature(content: str, thinking: str, calls: Sequence[tuple[str, Any]]) -> str:
    """The key a reply's exact text is kept under: what the client saw of it, canonically
    (content, thinking, each call's name and arguments)."""
    canonical = json.dumps(
        [content, thinking, [[name, args] for name, args in calls]],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return "ollama-" + hashlib.sha256(canonical.encode()).hexdigest()


def _assistant(m: Fields, state: ServerState, model: str) -> str:
    """An assistant message: the exact reply it came from when this server made it (by
    call ids, or by its signature), else its content and each call in the fallback format
    (thinking dropped)."""
    content = m.text("content") or ""
    thinking = m.text("thinking") or ""
    raw_calls = m.array("tool_calls") or []
    ids, calls = [], []
    for k, raw in enumerate(raw_calls):
        call = m.item("tool_calls", k, raw)
        fn = call.obj("function", required=True)
        assert fn is not None
        name = fn.req_text("name")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise fn.bad("arguments", "must be a JSON object") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise fn.bad("arguments", "must be a JSON object")
        calls.append((name, args))
        call_id = call.text("id")
        if call_id:
            ids.append(call_id)
    exact = state.store.reply_for(model, ids) if ids else None
    if exact is None:
        exact = state.store.reply_for(model, [signature(content, thinking, calls)])
    if exact is not None:
        return exact
    markers = state.markers(model)
    return content + "".join(fallback_text(markers, name, args) for name, args in calls)


def _messages(body: Fields, state: ServerState, model: str) -> list[dict[str, str]]:
    raw = body.array("messages") or []
    out = []
    for i, value in enumerate(raw):
        m = body.item("messages", i, value)
        _no_images(m)
        role = m.req_text("role")
        if role == "assistant":
            out.append({"role": "assistant", "content": _assistant(m, state, model)})
        elif role in ("system", "user", "tool"):
            out.append({"role": role, "content": m.text("content") or ""})
        else:
            raise m.bad("role", f"must be system, user, assistant or tool, got {role!r}")
    return out


# ---- replies ---------------------------------------------------------------------------------


def _figures(done: Done, arrived: float, loaded_s: float) -> dict[str, Any]:
    """Ollama's figures of a finished request (durations in nanoseconds; ``loaded_s``: how
    long it waited for its model to load), and erllama's own (the cached prompt tokens
    among them)."""
    st = done.stats
    return {
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": _ns(time.monotonic() - arrived),
        "load_duration": _ns(loaded_s),
        "prompt_eval_count": st.prompt_tokens,
        "prompt_eval_duration": _ns(st.prefill_s),
        "eval_count": st.completion_tokens,
        "eval_duration": _ns(st.generation_s),
        "erllama": extension(done),
    }


def _call_json(call: Call, index: int) -> dict[str, Any]:
    return {
        "id": call.id,
        "function": {"index": index, "name": call.name, "arguments": dict(call.arguments)},
    }


class _Seen:
    """What the client was sent of one reply, for its signature."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[Call] = []

    def add(self, piece: object) -> None:
        if isinstance(piece, Text):
            self.text.append(piece.text)
        elif isinstance(piece, Thinking):
            self.thinking.append(piece.text)
        elif isinstance(piece, Call):
            self.calls.append(piece)

    async def remember(self, state: ServerState, model: str, done: Done) -> None:
        """Keep the reply's exact text under its signature when the content alone would
        not render it (thinking, calls, a stop string)."""
        content, thinking = "".join(self.text), "".join(self.thinking)
        exact = await reply_text(state, model, done, self.text)
        if exact != content:
            sig = signature(content, thinking, [(c.name, dict(c.arguments)) for c in self.calls])
            await state.store.remember(model, [sig], exact)


def _load_reply(name: str, chat: bool, reason: str) -> Response:
    """The answer to an empty request: the model is loaded (or unloaded)."""
    out: dict[str, Any] = {"model": name, "created_at": _now()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update({"done": True, "done_reason": reason})
    return json_response(out)


async def _run(
    request: Request,
    state: ServerState,
    name: str,
    started: Started,
    arrived: float,
    chat: bool,
    stream: bool,
    loaded_s: float,
) -> Response:
    model = started.job.model

    def chunk(**fields: Any) -> dict[str, Any]:
        return {"model": name, "created_at": _now(), **fields}

    def delta(piece: Text | Thinking | Call, index: int) -> dict[str, Any]:
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            if isinstance(piece, Text):
                message["content"] = piece.text
            elif isinstance(piece, Thinking):
                message["thinking"] = piece.text
            else:
                message["tool_calls"] = [_call_json(piece, index)]
            return chunk(message=message, done=False)
        if isinstance(piece, Thinking):
            return chunk(response="", thinking=piece.text, done=False)
        assert isinstance(piece, Text)  # /api/generate parses no calls
        return chunk(response=piece.text, done=False)

    def last(done: Done) -> dict[str, Any]:
        body = chunk(
            **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        )
        body["done"] = True
        if not chat:
            body["context"] = list(done.context)
        body.update(_figures(done, arrived, loaded_s))
        return body

    if stream:

        async def lines() -> AsyncIterator[str]:
            seen = _Seen()
            try:
                async with aclosing(pieces(state, started, "call_")) as parts:
                    async for piece in parts:
                        if isinstance(piece, Text | Thinking | Call):
                            seen.add(piece)
                            yield ndjson_line(delta(piece, len(seen.calls) - 1))
                        elif isinstance(piece, End):
                            if piece.finish == "cancelled":
                                yield ndjson_line(error_body(cancelled_error(), "ollama"))
                                return
                            if chat:
                                await seen.remember(state, model, piece.done)
                            yield ndjson_line(last(piece.done))
            except Exception as exc:
                yield ndjson_line(stream_error(exc, started, "ollama"))

        return NdjsonResponse(
            lines(),
            cleanup=lambda why: close(started, why),
            guard=stream_guard(state, "ollama"),
        )

    reply = await reply_unless_disconnected(request, state, started, "call_")
    if reply is None:
        return Response(status_code=499)
    assert reply.end is not None
    body = last(reply.end.done)
    if chat:
        seen = _Seen()
        for block in reply.blocks:
            seen.add(block)
        await seen.remember(state, model, reply.end.done)
        body["message"] = _message(reply)
    else:
        body["response"] = reply.text
        if reply.thinking:
            body["thinking"] = reply.thinking
    return json_response(body)


def _message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if reply.thinking:
        message["thinking"] = reply.thinking
    if reply.calls:
        message["tool_calls"] = [_call_json(c, i) for i, c in enumerate(reply.calls)]
    return message


# ---- /api/chat and /api/generate --------------------------------------------------------------


async def chat(request: Request, state: ServerState) -> Response:
    arrived = time.monotonic()
    body = await read_json(request, state.config.server.max_body_bytes)
    name, model = request_model(body, state)
    keep_alive = _keep_alive(body)
    if not body.array("messages"):
        return await _load_only(state, name, model, keep_alive, chat=True)
    track = state.metrics.track("ollama", state.model_label(model))
    try:
        loaded_s = await state.use_model(model, keep_alive)
        tools = _tools(body)
        options, num_ctx = _options(body, state)
        job = ChatJob(
            explain_cache=explain_cache(body),
            model=model,
            messages=_messages(body, state, model),
            tools=tools,
            functions=functions_of(tools or []),
            choice="auto" if tools else "none",
            response_format=_format(body),
            options={**options, **_think(body, state, model), **cache_salt(body, request.scope)},
            renames=RENAMES,
            context_limit=num_ctx,
            keep_alive=keep_alive,
        )
        started = await start(state, job, track, request_id(request.scope))
    except BaseException as exc:
        track.end_with(exc)
        raise
    stream = body.flag("stream", True)
    return await _run(request, state, name, started, arrived, True, stream, loaded_s)


async def _generate_prompt(
    body: Fields, state: ServerState, model: str
) -> tuple[list[dict[str, str]], list[int] | None]:
    """The messages of a /api/generate request, and its prompt's token ids when they are
    not simply those messages rendered: a raw prompt, or one continuing ``context``."""
    prompt = body.text("prompt") or ""
    system = body.text("system")
    context = body.array("context")
    if context is not None and not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context
    ):
        raise body.bad("context", "must be an array of token ids")
    engine = state.engine
    state.check_model(model)
    try:
        if body.flag("raw"):
            ids = await engine.tokenize(model, prompt, add_special=not context, parse_special=True)
            return [], [*(context or []), *ids]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        if not context:
            return messages, None
        try:
            return messages, await continuation(engine, model, context, messages, None)
        except NoContinuation as exc:
            raise body.bad(
                "context", f"this model's chat template cannot continue it: {exc}"
            ) from None
    except ErllamaError as exc:
        raise from_engine(exc, {**RENAMES, "prompt": "prompt", "text": "prompt"}) from exc


async def generate(request: Request, state: ServerState) -> Response:
    arrived = time.monotonic()
    body = await read_json(request, state.config.server.max_body_bytes)
    name, model = request_model(body, state)
    keep_alive = _keep_alive(body)
    _no_images(body)
    if body.text("suffix"):
        raise body.bad("suffix", "is not supported (no fill-in-the-middle)")
    if body.text("template"):
        raise body.bad("template", "is not supported: the model's own chat template is used")
    if not body.text("prompt") and not body.array("context"):
        return await _load_only(state, name, model, keep_alive, chat=False)
    track = state.metrics.track("ollama", state.model_label(model))
    try:
        loaded_s = await state.use_model(model, keep_alive)
        messages, prompt = await _generate_prompt(body, state, model)
        options, num_ctx = _options(body, state)
        job = ChatJob(
            explain_cache=explain_cache(body),
            model=model,
            messages=messages,
            response_format=_format(body),
            options={**options, **_think(body, state, model), **cache_salt(body, request.scope)},
            renames={**RENAMES, "prompt": "prompt"},
            prompt=prompt,
            context_limit=num_ctx,
            keep_alive=keep_alive,
        )
        started = await start(state, job, track, request_id(request.scope))
    except BaseException as exc:
        track.end_with(exc)
        raise
    stream = body.flag("stream", True)
    return await _run(request, state, name, started, arrived, False, stream, loaded_s)


# ---- embeddings ------------------------------------------------------------------------------

#: Most inputs one /api/embed request may hold.
MAX_EMBED_INPUTS = 256


async def _embed_all(
    request: Request,
    state: ServerState,
    model: str,
    texts: Sequence[str],
    truncate: bool,
    field: str,
) -> tuple[list[list[float]], int] | None:
    engine = state.engine
    n_ctx = engine.model_info(model).n_ctx

    async def work() -> tuple[list[list[float]], int]:
        vectors, n_tokens = [], 0
        for i, text in enumerate(texts):
            ids = await engine.tokenize(model, text)
            if len(ids) > n_ctx:
                if not truncate:
                    where = f"{field}[{i}]" if len(texts) > 1 or field == "input" else field
                    raise ApiError.bad_param(
                        where, f"is {len(ids)} tokens, longer than the context ({n_ctx})"
                    )
                ids = ids[:n_ctx]
            n_tokens += len(ids)
            vectors.append(await engine.embed(model, ids))
        return vectors, n_tokens

    try:
        return await unless_disconnected(request, work)
    except ErllamaError as exc:
        raise from_engine(exc, {"prompt": field, "tokens": field, "text": field}) from exc


async def embed(request: Request, state: ServerState) -> Response:
    arrived = time.monotonic()
    body = await read_json(request, state.config.server.max_body_bytes)
    name, model = request_model(body, state)
    keep_alive = _keep_alive(body)
    body.refuse("dimensions")
    value = body.get("input")
    texts: list[Any] = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise body.bad("input", "must be a string or an array of strings")
    if len(texts) > MAX_EMBED_INPUTS:
        raise body.bad("input", f"at most {MAX_EMBED_INPUTS} inputs per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ApiError.bad_param(f"input[{i}]", "must be a non-empty string")
    loaded_s = await state.use_model(model, keep_alive)
    result = await _embed_all(request, state, model, texts, body.flag("truncate", True), "input")
    if result is None:
        return Response(status_code=499)
    vectors, n_tokens = result
    return json_response(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": _ns(time.monotonic() - arrived),
            "load_duration": _ns(loaded_s),
            "prompt_eval_count": n_tokens,
        }
    )


async def embeddings(request: Request, state: ServerState) -> Response:
    """The older single-prompt route: ``{"prompt"}`` -> ``{"embedding"}``."""
    body = await read_json(request, state.config.server.max_body_bytes)
    _name, model = request_model(body, state)
    keep_alive = _keep_alive(body)
    prompt = body.text("prompt") or ""
    await state.use_model(model, keep_alive)
    if not prompt:
        return json_response({"embedding": []})
    result = await _embed_all(request, state, model, [prompt], True, "prompt")
    if result is None:
        return Response(status_code=499)
    return json_response({"embedding": result[0][0]})
