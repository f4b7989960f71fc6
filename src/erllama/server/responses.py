"""OpenAI's Responses API: ``POST /v1/responses`` (streamed and not), ``GET`` and ``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``, in the shapes the official
``openai`` package (``responses.create``, ``responses.stream``) and the openai-agents SDK
parse. docs/server.md says what is supported, ignored or refused.

A reply's output items, in the order the model produced them: a ``reasoning`` item for
its thinking span (a model with thinking markers), a ``message`` for answer text, a
``function_call`` per tool call (each arriving whole, as in the other APIs).

Chaining: a response is stored (unless ``store`` is false) with the exact token ids in its
sequence's KV at the end. A request naming it in ``previous_response_id`` continues from
those tokens (chaining.py), so every chained turn restores the whole previous context
from the cache (or the sequence's live KV) instead of prefilling a re-rendered history.
It renders the whole conversation instead only when it cannot continue the tokens: another
model (fingerprint), or other ``instructions`` or ``tools`` than the previous response's.

Agents that send their history back every turn (no ``previous_response_id``) still get
the exact bytes: the ids of every output item of a reply (and its calls' ``call_id``)
map to the reply's exact text, as tool-call ids do in the other APIs (toolcalls.py).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import attrs
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from ..events import Done
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
    ThinkingStop,
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
from .outputs import Output, item_id
from .params import (
    EXTENSION_RENAMES,
    cache_salt,
    explain_cache,
    extension_options,
    functions_of,
    max_tokens,
    sampling,
    tool_spec,
    unique,
)
from .sse import EventStreamResponse, typed_event
from .state import ServerState
from .stored import StoredResponse, new_response_id
from .toolcalls import fallback_text

__all__ = ["create", "delete", "input_items", "retrieve"]

#: Engine parameter names as this API spells them.
RENAMES: Mapping[str, str] = {
    "prompt": "input",
    "grammar": "text.format",
    "response_format": "text.format.schema",
    "response_format.json_schema.schema": "text.format.schema",
    "max_tokens": "max_output_tokens",
    **EXTENSION_RENAMES,
}


# ---- input -----------------------------------------------------------------------------------


def _text_of(f: Fields, field: str) -> str:
    """A string, or content parts of text (joined by newlines); anything else is refused."""
    value = f.get(field)
    if value is None:
        raise f.bad(field, "is required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise f.bad(field, "must be a string or an array of content parts")
    texts = []
    for j, raw in enumerate(value):
        p = f.item(field, j, raw)
        kind = p.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(p.text("text", required=True) or "")
        elif kind == "refusal":
            texts.append(p.text("refusal") or "")
        else:
            raise p.bad("type", f"only text content is supported, got {kind!r}")
    return "\n".join(texts)


class _Assistant:
    """Consecutive assistant-side input items (messages, reasoning, function calls): one
    reply of the model, rendered as one assistant message."""

    def __init__(self, state: ServerState, model: str) -> None:
        self.state = state
        self.model = model
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.calls: list[str] = []

    def note(self, item_id: str | None) -> None:
        if item_id:
            self.ids.append(item_id)

    def flush(self, out: list[dict[str, str]]) -> None:
        """The reply's exact text when its ids came from one reply of this server, else
        its text and each call in the fallback format (reasoning dropped)."""
        if not (self.ids or self.texts or self.calls):
            return
        exact = self.state.store.reply_for(self.model, self.ids) if self.ids else None
        content = exact if exact is not None else "".join(self.texts) + "".join(self.calls)
        out.append({"role": "assistant", "content": content})
        self.ids, self.texts, self.calls = [], [], []


def _input(
    body: Fields, state: ServerState, model: str
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The input as chat-template messages, and as normalised items (each with an id)."""
    value = body.get("input")
    if isinstance(value, str):
        item = {
            "id": item_id("msg_"),
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": value}],
        }
        return [{"role": "user", "content": value}], [item]
    if not isinstance(value, list) or not value:
        raise body.bad("input", "must be a string or a non-empty array of items")
    messages: list[dict[str, str]] = []
    items: list[dict[str, Any]] = []
    group = _Assistant(state, model)
    markers = state.markers(model)
    for i, raw in enumerate(value):
        it = body.item("input", i, raw)
        kind = it.get("type")
        if kind is None and it.has("role"):
            kind = "message"
        item = dict(it.data)
        if kind == "message":
            role = it.req_text("role")
            text = _text_of(it, "content")
            part = "output_text" if role == "assistant" else "input_text"
            item.setdefault("id", item_id("msg_"))
            item.update(type="message", content=[{"type": part, "text": text}])
            if role == "assistant":
                group.note(it.text("id"))
                group.texts.append(text)
            elif role in ("user", "system", "developer"):
                group.flush(messages)
                messages.append({"role": "user" if role == "user" else "system", "content": text})
            else:
                raise it.bad("role", f"must be user, assistant, system or developer, got {role!r}")
        elif kind == "function_call":
            call_id = it.req_text("call_id")
            name = it.req_text("name")
            arguments = it.text("arguments") or "{}"
            item.setdefault("id", item_id("fc_"))
            group.note(it.text("id"))
            group.note(call_id)
            group.calls.append(fallback_text(markers, name, arguments))
        elif kind == "reasoning":
            item.setdefault("id", item_id("rs_"))
            group.note(it.text("id"))
        elif kind == "function_call_output":
            it.req_text("call_id")
            output = _text_of(it, "output")
            item.setdefault("id", item_id("fco_"))
            group.flush(messages)
            messages.append({"role": "tool", "content": output})
        elif kind == "item_reference":
            raise it.bad(
                "type",
                "item_reference is not supported: send the item itself, "
                "or chain with previous_response_id",
            )
        else:
            raise it.bad(
                "type",
                f"must be message, function_call, function_call_output or reasoning, got {kind!r}",
            )
        items.append(item)
    group.flush(messages)
    return messages, items


# ---- request fields --------------------------------------------------------------------------


def _tools(body: Fields) -> tuple[list[dict[str, Any]] | None, str, str | None, Any]:
    """Function tools (as the template takes them), the choice, the forced function, and
    the tools as the response echoes them."""
    raw = body.array("tools")
    tools, echo = [], []
    for i, value in enumerate(raw or []):
        t = body.item("tools", i, value)
        if t.get("type") != "function":
            raise t.bad("type", f"only function tools are supported, got {t.get('type')!r}")
        tools.append(tool_spec(t, "name", "description", "parameters")[1])
        echo.append({"strict": None, "description": None, "parameters": None, **t.data})
    unique([t["function"]["name"] for t in tools], "tools")
    choice = body.get("tool_choice")
    if choice is None:
        return (tools or None), ("auto" if tools else "none"), None, echo
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise body.bad("tool_choice", "must be none, auto, required or a named function")
        if choice != "none" and not tools:
            raise body.bad("tool_choice", f"{choice!r} needs tools")
        return (tools or None), choice, None, echo
    c = body.obj("tool_choice")
    assert c is not None
    if c.get("type") != "function":
        raise c.bad("type", "only 'function' tool choices are supported")
    name = c.req_text("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise c.bad("name", f"no tool named {name!r}")
    return tools, "required", name, echo


def _text_format(body: Fields) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``text.format`` as a response_format, and the ``text`` the response echoes."""
    text = body.obj("text")
    fmt = text.obj("format") if text is not None else None
    echo = dict(text.data) if text is not None else {}
    if fmt is None:
        return None, {**echo, "format": {"type": "text"}}
    kind = fmt.get("type")
    if kind == "text":
        return None, echo
    if kind == "json_object":
        return {"type": "json_object"}, echo
    if kind == "json_schema":
        schema = fmt.obj("schema", required=True)
        assert schema is not None
        return {"type": "json_schema", "json_schema": {"schema": schema.data}}, echo
    raise fmt.bad("type", "must be text, json_object or json_schema")


def _refuse(body: Fields) -> None:
    if body.flag("background"):
        raise body.bad("background", "background responses are not supported")
    body.refuse("conversation", "is not supported: chain responses with previous_response_id")
    body.refuse("prompt", "prompt templates are not supported")
    if body.integer("top_logprobs") not in (None, 0):
        raise body.bad("top_logprobs", "log probabilities are not supported")


def _metadata(body: Fields) -> dict[str, str]:
    """``metadata``: at most 16 string values under keys of at most 64 characters, as
    OpenAI takes it; stored and echoed."""
    metadata = body.obj("metadata")
    if metadata is None:
        return {}
    if len(metadata.data) > 16:
        raise body.bad("metadata", "has more than 16 keys")
    for key, value in metadata.data.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise metadata.bad(key, "must be a string of at most 512 characters (keys: 64)")
    return dict(metadata.data)


@attrs.define(eq=False)
class _Turn:
    """One parsed request: the job, and what its response echoes and stores."""

    job: ChatJob
    name: str
    items: list[dict[str, Any]]
    #: The conversation before this request (no instructions), and this request's turns.
    history: list[dict[str, str]]
    new: list[dict[str, str]]
    instructions: str | None
    template_tools: list[dict[str, Any]] | None
    previous: StoredResponse | None
    #: The model's effective fingerprint when the request was parsed.
    fingerprint: str
    store: bool
    echo: dict[str, Any]


async def _parse(body: Fields, state: ServerState, name: str, scope: Mapping[str, Any]) -> _Turn:
    model = name
    _refuse(body)
    await state.use_model(model)
    new, items = _input(body, state, model)
    tools, choice, forced, tools_echo = _tools(body)
    response_format, text_echo = _text_format(body)
    limit, _ = max_tokens(body, state, ("max_output_tokens",), None)
    options: dict[str, Any] = {
        "max_tokens": limit,
        **sampling(body, state),
        **extension_options(body),
        **cache_salt(body, scope),
    }
    if state.engine.model_info(model).thinking_markers is not None:
        options["thinking"] = True  # the thinking span becomes a reasoning item
    instructions = body.text("instructions")
    store = body.flag("store", True)
    reasoning = body.obj("reasoning")
    metadata = _metadata(body)
    body.flag("parallel_tool_calls")
    truncation = body.text("truncation") or "disabled"
    if truncation not in ("auto", "disabled"):
        raise body.bad("truncation", "must be auto or disabled")
    previous_id = body.text("previous_response_id")
    previous = None
    if previous_id is not None:
        previous = await state.responses.get(previous_id)
        if previous is None:
            raise ApiError(
                400,
                "invalid_request",
                f"invalid previous_response_id: no stored response {previous_id!r} "
                "(unknown, deleted, stored with store=false, or forgotten)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
    # A chained request without instructions or tools keeps the previous response's: they
    # are in its context already.
    effective = (
        instructions if instructions is not None else (previous.instructions if previous else None)
    )
    template_tools = tools
    if template_tools is None and previous is not None and previous.tools:
        template_tools = [dict(t) for t in previous.tools]
    history = [dict(m) for m in previous.messages] if previous is not None else []
    system = [{"role": "system", "content": effective}] if effective else []
    prompt = None
    fingerprint = state.engine.model_info(model).effective_fingerprint
    if previous is not None and _continues(previous, fingerprint, effective, template_tools):
        try:
            prompt = await continuation(state.engine, model, previous.context, new, template_tools)
        except NoContinuation:
            prompt = None
        except ErllamaError as exc:
            raise from_engine(exc, RENAMES) from exc
        if prompt is not None and previous.finish_key and "parent_key" not in options:
            options["parent_key"] = previous.finish_key
    job = ChatJob(
        explain_cache=explain_cache(body),
        model=model,
        messages=[*system, *history, *new],
        tools=template_tools,
        functions=functions_of(tools or []),
        choice=choice,  # type: ignore[arg-type]
        forced=forced,
        response_format=response_format,
        options=options,
        renames=RENAMES,
        prompt=prompt,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.integer("max_output_tokens"),
        "metadata": metadata,
        "parallel_tool_calls": body.flag("parallel_tool_calls", True),
        "previous_response_id": previous_id,
        "reasoning": {
            "effort": reasoning.text("effort") if reasoning else None,
            "summary": reasoning.text("summary") if reasoning else None,
        },
        "store": store,
        "temperature": options["temperature"],
        "text": text_echo,
        "tool_choice": body.get("tool_choice")
        if body.get("tool_choice") is not None
        else ("auto" if tools else "none"),
        "tools": tools_echo,
        "top_p": options.get("top_p", 1.0),
        "truncation": truncation,
        "user": body.text("user"),
    }
    return _Turn(
        job=job,
        name=name,
        items=items,
        history=history,
        new=new,
        instructions=effective,
        template_tools=template_tools,
        previous=previous,
        fingerprint=fingerprint,
        store=store,
        echo=echo,
    )


def _continues(
    previous: StoredResponse,
    fingerprint: str,
    instructions: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
) -> bool:
    """Whether the previous context can be continued as it is: the same model (weights and
    adapters, whatever its id), and the instructions and tools it was rendered with."""
    return (
        previous.fingerprint == fingerprint
        and previous.instructions == instructions
        and list(previous.tools or []) == list(tools or [])
    )


# ---- output ----------------------------------------------------------------------------------


def _usage(done: Done) -> dict[str, Any]:
    st = done.stats
    return {
        "input_tokens": st.prompt_tokens,
        "input_tokens_details": {"cached_tokens": st.cache_delta.read, "cache_write_tokens": 0},
        "output_tokens": st.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": st.prompt_tokens + st.completion_tokens,
    }


def _object(
    turn: _Turn,
    response_id: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    done: Done | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": turn.name,
        "output": output,
        **turn.echo,
        "usage": _usage(done) if done is not None else None,
    }
    if done is not None:
        out["completed_at"] = int(time.time())
        out["erllama"] = extension(done)
    return out


async def _finish(
    state: ServerState,
    turn: _Turn,
    response_id: str,
    created: int,
    output: Output,
    end: End,
    generated: Sequence[str],
) -> dict[str, Any]:
    """The finished response object; the reply's exact text kept under its items' ids,
    and the response stored (unless ``store`` is false) before anyone can chain on it."""
    done = end.done
    status = "incomplete" if end.finish == "length" else "completed"
    obj = _object(turn, response_id, created, status, output.items, done)
    model = turn.job.model
    exact = await reply_text(state, model, done, generated)
    await state.store.remember(model, output.ids, exact)
    if turn.store:
        await state.responses.put(
            StoredResponse(
                id=response_id,
                model=model,
                response=obj,
                input_items=turn.items,
                messages=[*turn.history, *turn.new, {"role": "assistant", "content": exact}],
                instructions=turn.instructions,
                tools=turn.template_tools,
                context=done.context,
                finish_key=done.stats.finish_key,
                fingerprint=turn.fingerprint,
            )
        )
    return obj


# ---- routes ----------------------------------------------------------------------------------


def _finite(value: Any, path: str) -> None:
    """Refuse NaN and infinities anywhere in the body (Python's JSON reader takes them,
    JSON has none): a response echoes and stores parts of its request, as JSON."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise ApiError.bad_param(where, "must be a finite number")
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))


async def create(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    _finite(body.data, "")
    name = state.model_of(body)
    track = state.metrics.track("responses", state.model_label(name))
    try:
        turn = await _parse(body, state, name, request.scope)
        started = await start(state, turn.job, track, request_id(request.scope))
    except BaseException as exc:
        track.end_with(exc)
        raise
    response_id = new_response_id()
    created = int(time.time())
    if body.flag("stream"):
        numbers = itertools.count()
        guard = stream_guard(
            state,
            "openai",
            error_event=lambda err: typed_event(
                {**_error_event(error_body(err, "openai")), "sequence_number": next(numbers)}
            ),
        )
        return EventStreamResponse(
            _events(state, turn, started, response_id, created, numbers),
            cleanup=lambda why: close(started, why),
            guard=guard,
        )
    reply = await reply_unless_disconnected(request, state, started, "call_")
    if reply is None:
        return Response(status_code=499)
    assert reply.end is not None
    output = _replay(reply)
    output.close("incomplete" if reply.end.finish == "length" else "completed")
    generated = [b.text for b in reply.blocks if isinstance(b, Text)]
    return json_response(
        await _finish(state, turn, response_id, created, output, reply.end, generated)
    )


def _replay(reply: Reply) -> Output:
    output = Output()
    for block in reply.blocks:
        if isinstance(block, Text):
            output.text(block.text)
        elif isinstance(block, Thinking):
            output.thinking(block.text)
        else:
            output.call(block)
    return output


async def _events(
    state: ServerState,
    turn: _Turn,
    started: Started,
    response_id: str,
    created: int,
    numbers: Iterator[int],
) -> AsyncIterator[str]:
    def encode(events: list[dict[str, Any]]) -> str:
        return "".join(typed_event({**e, "sequence_number": next(numbers)}) for e in events)

    initial = _object(turn, response_id, created, "in_progress", [])
    yield encode(
        [
            {"type": "response.created", "response": initial},
            {"type": "response.in_progress", "response": initial},
        ]
    )
    output = Output()
    generated: list[str] = []
    try:
        async with aclosing(pieces(state, started, "call_")) as parts:
            async for piece in parts:
                if isinstance(piece, Text):
                    generated.append(piece.text)
                    events = output.text(piece.text)
                elif isinstance(piece, Thinking):
                    events = output.thinking(piece.text)
                elif isinstance(piece, ThinkingStop):
                    events = output.thinking_end()
                elif isinstance(piece, Call):
                    events = output.call(piece)
                else:
                    assert isinstance(piece, End)
                    if piece.finish == "cancelled":
                        yield encode([_error_event(error_body(cancelled_error(), "openai"))])
                        return
                    incomplete = piece.finish == "length"
                    events = output.close("incomplete" if incomplete else "completed")
                    obj = await _finish(state, turn, response_id, created, output, piece, generated)
                    kind = "response.incomplete" if incomplete else "response.completed"
                    events.append({"type": kind, "response": obj})
                if events:
                    yield encode(events)
    except Exception as exc:
        yield encode([_error_event(stream_error(exc, started, "openai"))])


def _error_event(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Responses API's ``error`` event from an OpenAI error body; its ``error`` object
    is what makes the openai package raise (as it does for a failed chat stream) instead
    of ending quietly."""
    err = body["error"]
    return {
        "type": "error",
        "code": err["code"],
        "message": err["message"],
        "param": err["param"],
        "error": err,
    }


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"no stored response {response_id!r}",
        param="response_id",
        code="response_not_found",
    )


async def retrieve(request: Request, state: ServerState) -> Response:
    response_id = request.path_params["response_id"]
    if request.query_params.get("stream") in ("true", "1"):
        raise ApiError.bad_param(
            "stream", "replaying a stored response as a stream is not supported"
        )
    found = await state.responses.get(response_id)
    if found is None:
        raise _not_found(response_id)
    return json_response(found.response)


async def delete(request: Request, state: ServerState) -> Response:
    response_id = request.path_params["response_id"]
    if not await state.responses.delete(response_id):
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def input_items(request: Request, state: ServerState) -> Response:
    """A stored response's input items: ``order`` (``desc`` by default, as OpenAI's),
    ``limit`` (1 to 100, default 20) and ``after`` (an item id) page through them."""
    response_id = request.path_params["response_id"]
    found = await state.responses.get(response_id)
    if found is None:
        raise _not_found(response_id)
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError.bad_param("order", "must be asc or desc")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise ApiError.bad_param("limit", "must be an integer") from None
    if not 1 <= limit <= 100:
        raise ApiError.bad_param("limit", "must be in [1, 100]")
    items = list(found.input_items)
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [i.get("id") for i in items]
        if after not in ids:
            raise ApiError.bad_param("after", f"no input item {after!r} in this response")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(items) > limit,
        }
    )
