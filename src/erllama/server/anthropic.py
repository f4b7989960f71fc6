"""The Anthropic-compatible routes: ``/v1/messages`` (streaming and not) and
``/v1/messages/count_tokens``, in the shapes the official ``anthropic`` package parses."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from ..events import Done
from .body import Fields, read_json
from .errors import ApiError, error_body, from_engine, json_response
from .generation import (
    Call,
    CallArguments,
    CallStart,
    ChatJob,
    End,
    Finish,
    Started,
    Text,
    Thinking,
    ThinkingStop,
    cancelled_error,
    close,
    extension,
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
    check_messages,
    explain_cache,
    extension_options,
    functions_of,
    max_tokens,
    sampling,
    tool_spec,
    unique,
)
from .sse import EventStreamResponse, NoResponse, anthropic_event
from .state import ServerState
from .toolcalls import fallback_text

__all__ = ["count_tokens", "messages"]


def _text_of(f: Fields, field: str) -> str:
    """A string, or an array of text blocks joined by newlines."""
    value = f.get(field)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise f.bad(field, "must be a string or an array of text blocks")
    texts = []
    for j, raw in enumerate(value):
        block = f.item(field, j, raw)
        if block.get("type") != "text":
            raise block.bad(
                "type", f"only text blocks are supported here, got {block.get('type')!r}"
            )
        texts.append(block.text("text", required=True) or "")
    return "\n".join(texts)


def _user(m: Fields, out: list[dict[str, str]]) -> None:
    """A user message: its text, and each tool_result as a message of role ``tool``."""
    content = m.get("content")
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    blocks = m.array("content", required=True)
    assert blocks is not None
    texts: list[str] = []
    for j, raw in enumerate(blocks):
        b = m.item("content", j, raw)
        kind = b.get("type")
        if kind == "text":
            texts.append(b.text("text", required=True) or "")
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            b.req_text("tool_use_id")
            out.append({"role": "tool", "content": _text_of(b, "content")})
        else:
            raise b.bad("type", f"only text and tool_result blocks are supported, got {kind!r}")
    if texts or not blocks:
        out.append({"role": "user", "content": "\n".join(texts)})


def _assistant(m: Fields, state: ServerState, model: str) -> str:
    """An assistant message's text; with tool_use blocks, the exact reply they came from
    when this server made them, else text plus the fallback rendering of each call
    (thinking blocks are then dropped)."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    blocks = m.array("content", required=True)
    assert blocks is not None
    texts, ids, calls = [], [], []
    markers = state.markers(model)
    for j, raw in enumerate(blocks):
        b = m.item("content", j, raw)
        kind = b.get("type")
        if kind == "text":
            texts.append(b.text("text", required=True) or "")
        elif kind == "tool_use":
            ids.append(b.req_text("id"))
            tool_input = b.obj("input")
            calls.append(
                fallback_text(markers, b.req_text("name"), tool_input.data if tool_input else {})
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise b.bad("type", f"must be text, thinking or tool_use, got {kind!r}")
    exact = state.store.reply_for(model, ids) if ids else None
    return exact if exact is not None else "".join(texts) + "".join(calls)


def _messages(body: Fields, state: ServerState, model: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(body, "system")})
    raw = body.array("messages", required=True, empty=False)
    assert raw is not None
    for i, value in enumerate(raw):
        m = body.item("messages", i, value)
        role = m.req_text("role")
        if role == "user":
            _user(m, out)
        elif role == "assistant":
            if i == len(raw) - 1:
                raise m.bad("role", "a final assistant message (prefill) is not supported")
            out.append({"role": "assistant", "content": _assistant(m, state, model)})
        elif role == "system":
            out.append({"role": "system", "content": _text_of(m, "content")})
        else:
            raise m.bad("role", f"must be user or assistant, got {role!r}")
    return out


def _tools(body: Fields) -> tuple[list[dict[str, Any]] | None, str, str | None]:
    raw = body.array("tools")
    tools = []
    for i, value in enumerate(raw or []):
        t = body.item("tools", i, value)
        if t.get("type") not in (None, "custom"):
            raise t.bad("type", "only client tools (name, input_schema) are supported")
        tools.append(tool_spec(t, "name", "description", "input_schema")[1])
    unique([t["function"]["name"] for t in tools], "tools")
    c = body.obj("tool_choice")
    if c is None:
        return (tools or None), ("auto" if tools else "none"), None
    kind = c.get("type")
    if kind == "none":
        return (tools or None), "none", None
    if kind not in ("auto", "any", "tool"):
        raise c.bad("type", "must be auto, any, tool or none")
    if not tools:
        raise c.bad("type", f"{kind!r} needs tools")
    if kind == "auto":
        return tools, "auto", None
    if kind == "any":
        return tools, "required", None
    name = c.req_text("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise c.bad("name", f"no tool named {name!r}")
    return tools, "required", name


def _thinking(body: Fields) -> dict[str, Any]:
    t = body.obj("thinking")
    if t is None:
        return {}
    kind = t.get("type")
    if kind == "disabled":
        return {}
    if kind == "adaptive":
        return {"thinking": True}
    if kind != "enabled":
        raise t.bad("type", "must be enabled, disabled or adaptive")
    budget = t.integer("budget_tokens", minimum=1)
    out: dict[str, Any] = {"thinking": True}
    if budget is not None:
        out["thinking_budget_tokens"] = budget
    return out


def _output_format(body: Fields) -> dict[str, Any] | None:
    oc = body.obj("output_config")
    fmt = oc.obj("format") if oc is not None else None
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema":
        raise fmt.bad("type", "must be json_schema")
    schema = fmt.obj("schema", required=True)
    assert schema is not None
    return {"type": "json_schema", "json_schema": {"schema": schema.data}}


def parse(
    body: Fields,
    state: ServerState,
    model: str,
    *,
    counting: bool = False,
    scope: Mapping[str, Any] | None = None,
) -> ChatJob:
    messages = _messages(body, state, model)
    tools, choice, forced = _tools(body)
    options: dict[str, Any] = {}
    renames: dict[str, str] = {
        "prompt": "messages",
        "grammar": "output_config.format",
        "response_format": "output_config.format.schema",
        "thinking_budget_tokens": "thinking.budget_tokens",
        "stop": "stop_sequences",
        **EXTENSION_RENAMES,
    }
    if not counting:
        if body.get("max_tokens") is None:
            raise body.bad("max_tokens", "is required")
        limit, _field = max_tokens(body, state, ("max_tokens",), None)
        options = {
            "max_tokens": limit,
            **sampling(body, state),
            **extension_options(body),
            **cache_salt(body, scope or {}),
        }
        options.update(_thinking(body))
        stop = body.array("stop_sequences")
        if stop:
            for i, s in enumerate(stop):
                if not isinstance(s, str):
                    raise ApiError.bad_param(f"stop_sequences[{i}]", "must be a string")
            options["stop"] = list(stop)
    return ChatJob(
        explain_cache=explain_cache(body),
        model=model,
        messages=messages,
        tools=tools,
        functions=functions_of(tools or []),
        choice=choice,  # type: ignore[arg-type]
        forced=forced,
        response_format=_output_format(body),
        options=options,
        renames=renames,
    )


def _stop_reason(finish: Finish, done: Done) -> str:
    if finish == "tool_calls":
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if done.stats.stop_sequence else "end_turn"


def _usage(done: Done) -> dict[str, int]:
    st = done.stats
    return {
        "input_tokens": st.prompt_tokens - st.cache_delta.read,
        "output_tokens": st.completion_tokens,
        "cache_read_input_tokens": st.cache_delta.read,
        "cache_creation_input_tokens": 0,
    }


async def messages(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = state.model_of(body)
    track = state.metrics.track("anthropic", state.model_label(model))
    try:
        job = parse(body, state, model, scope=request.scope)
        stream = body.flag("stream")
        started = await start(state, job, track, request_id(request.scope))
    except BaseException as exc:
        track.end_with(exc)
        raise
    message_id = "msg_" + secrets.token_hex(12)
    if stream:
        return EventStreamResponse(
            _events(state, started, message_id),
            cleanup=lambda why: close(started, why),
            guard=stream_guard(state, "anthropic"),
        )
    reply = await reply_unless_disconnected(request, state, started, "toolu_")
    if reply is None:
        return NoResponse()
    assert reply.end is not None
    content: list[dict[str, Any]] = []
    for block in reply.blocks:
        if isinstance(block, Thinking):
            content.append(
                {"type": "thinking", "thinking": block.text, "signature": reply.signature or ""}
            )
        elif isinstance(block, Text):
            content.append({"type": "text", "text": block.text})
        else:
            content.append(_tool_use(block))
    if not content:
        content.append({"type": "text", "text": ""})
    done = reply.end.done
    return json_response(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": _stop_reason(reply.end.finish, done),
            "stop_sequence": done.stats.stop_sequence,
            "usage": _usage(done),
            "erllama": extension(done),
        }
    )


def _tool_use(call: Call) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": dict(call.arguments)}


class _Blocks:
    """Content-block bookkeeping of one stream: which block is open, at which index."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def start(self, kind: str, block: dict[str, Any]) -> list[str]:
        out = self.stop()
        self.index += 1
        self.open = kind
        out.append(
            anthropic_event(
                {"type": "content_block_start", "index": self.index, "content_block": block}
            )
        )
        return out

    def delta(self, delta: dict[str, Any]) -> str:
        return anthropic_event({"type": "content_block_delta", "index": self.index, "delta": delta})

    def stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [anthropic_event({"type": "content_block_stop", "index": self.index})]


async def _events(state: ServerState, started: Started, message_id: str) -> AsyncIterator[str]:
    yield anthropic_event(
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": started.job.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0},
            },
        }
    )
    blocks = _Blocks()
    try:
        async with aclosing(pieces(state, started, "toolu_", stream_calls=True)) as parts:
            async for piece in parts:
                out: list[str] = []
                if isinstance(piece, Thinking):
                    if blocks.open != "thinking":
                        out += blocks.start(
                            "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                        )
                    out.append(blocks.delta({"type": "thinking_delta", "thinking": piece.text}))
                elif isinstance(piece, ThinkingStop):
                    if blocks.open != "thinking":
                        out += blocks.start(
                            "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                        )
                    sig = piece.signature or ""
                    out.append(blocks.delta({"type": "signature_delta", "signature": sig}))
                    out += blocks.stop()
                elif isinstance(piece, Text):
                    if blocks.open != "text":
                        out += blocks.start("text", {"type": "text", "text": ""})
                    out.append(blocks.delta({"type": "text_delta", "text": piece.text}))
                elif isinstance(piece, CallStart):
                    out += blocks.start(
                        "tool_use",
                        {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}},
                    )
                elif isinstance(piece, CallArguments):
                    out.append(
                        blocks.delta({"type": "input_json_delta", "partial_json": piece.text})
                    )
                elif isinstance(piece, Call):
                    if not piece.streamed:
                        out += blocks.start(
                            "tool_use",
                            {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}},
                        )
                        out.append(
                            blocks.delta(
                                {"type": "input_json_delta", "partial_json": piece.arguments_json}
                            )
                        )
                    out += blocks.stop()
                elif isinstance(piece, End):
                    if piece.finish == "cancelled":
                        out.append(anthropic_event(error_body(cancelled_error(), "anthropic")))
                        yield "".join(out)
                        return
                    out += blocks.stop()
                    done = piece.done
                    out.append(
                        anthropic_event(
                            {
                                "type": "message_delta",
                                "delta": {
                                    "stop_reason": _stop_reason(piece.finish, done),
                                    "stop_sequence": done.stats.stop_sequence,
                                },
                                "usage": _usage(done),
                                "erllama": extension(done),
                            }
                        )
                    )
                    out.append(anthropic_event({"type": "message_stop"}))
                if out:
                    yield "".join(out)
    except Exception as exc:
        yield anthropic_event(stream_error(exc, started, "anthropic"))


async def count_tokens(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = state.model_of(body)
    job = parse(body, state, model, counting=True)
    await state.use_model(model)
    check_messages(job.messages, state)
    try:
        prompt = await state.engine.apply_chat_template(model, job.messages, None, job.tools)
    except ErllamaError as exc:
        raise from_engine(exc, job.renames) from exc
    return json_response({"input_tokens": len(prompt)})
