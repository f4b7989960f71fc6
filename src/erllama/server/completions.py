"""OpenAI's legacy ``/v1/completions``: one prompt (text or token ids) continued, ``n``
choices, ``echo``, ``logprobs`` (parallel lists), streaming or not, in the shapes the
official ``openai`` package parses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ErllamaError
from ..events import Done
from .body import Fields, read_json
from .errors import error_body, from_engine, json_response
from .generation import (
    ChatJob,
    End,
    Started,
    Text,
    cancelled_error,
    close_all,
    extension,
    keep_alive_of,
    pieces,
    replies_unless_disconnected,
    start_choices,
    stream_error,
    stream_guard,
)
from .guard import request_id
from .logprobs import completion_logprobs, completion_request
from .openai import choices_of, closing_events, new_id, options_of, stream_flags, usage_of
from .params import explain_cache
from .sse import EventStreamResponse, NoResponse, openai_event
from .state import ServerState
from .structured import constraint

__all__ = ["COMPLETION_DEFAULT_TOKENS", "completions"]

#: What a legacy completion generates when the request names no max_tokens (OpenAI's own
#: default for this endpoint).
COMPLETION_DEFAULT_TOKENS = 16


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
        raise body.bad("prompt", "one prompt per request is supported (use n for choices)")
    raise body.bad("prompt", "must be a non-empty string or array of token ids")


async def completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.config.server.max_body_bytes)
    model = state.model_of(body)
    track = state.metrics.track("openai", state.model_label(model))
    try:
        prompt = _prompt(body)
        body.refuse("suffix", "is not supported (no fill-in-the-middle)")
        n = choices_of(body)
        best_of = body.integer("best_of", minimum=1)
        if best_of is not None and best_of != n:
            raise body.bad("best_of", "only best_of = n is supported (choices are not ranked)")
        echo = body.flag("echo")
        options, renames = options_of(
            request, body, state, ("max_tokens",), COMPLETION_DEFAULT_TOKENS
        )
        logprobs = completion_request(body)
        if logprobs is not None:
            if echo:
                raise body.bad(
                    "echo", "cannot be combined with logprobs (prompt log probabilities are "
                    "not computed)",
                )  # fmt: skip
            options["logprobs"] = logprobs
        stream, include_usage = stream_flags(body)
        shape = constraint(body)
        await state.use_model(model, keep_alive_of(options)[0])
        ids, echoed = await _ids_and_text(state, model, prompt, echo)
        job = ChatJob(
            explain_cache=explain_cache(body),
            model=model,
            messages=[],
            prompt=ids,
            response_format=shape.response_format,
            grammar=shape.grammar,
            options=options,
            renames={"grammar": shape.field, **renames},
        )
        started = await start_choices(state, job, track, request_id(request.scope), n)
    except BaseException as exc:
        track.end_with(exc)
        raise
    completion_id = new_id("cmpl-")
    created = int(time.time())

    def shape_of(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": state.fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if stream:
        events = _events(state, started, shape_of, echoed, logprobs is not None, include_usage)
        return EventStreamResponse(
            events, cleanup=lambda why: close_all(started, why), guard=stream_guard(state, "openai")
        )
    replies = await replies_unless_disconnected(request, state, started, "call_")
    if replies is None:
        return NoResponse()
    choices = []
    for i, reply in enumerate(replies):
        assert reply.end is not None
        choice = shape_of(i, echoed + reply.text, reply.end.finish)["choices"][0]
        if logprobs is not None:
            choice["logprobs"] = completion_logprobs(reply.logprobs, len(echoed))
        if len(replies) > 1:
            choice["erllama"] = extension(reply.end.done)
        choices.append(choice)
    dones = [r.end.done for r in replies if r.end is not None]
    out = shape_of(0, "", None)
    out["choices"] = choices
    out["usage"] = usage_of(dones)
    out["erllama"] = extension(dones[0])
    return json_response(out)


async def _ids_and_text(
    state: ServerState, model: str, prompt: str | list[int], echo: bool
) -> tuple[list[int], str]:
    """The prompt's token ids (a text prompt tokenized as the engine would, with its BOS),
    and its text when it is echoed."""
    try:
        if isinstance(prompt, str):
            return await state.engine.tokenize(model, prompt), prompt if echo else ""
        text = await state.engine.detokenize(model, prompt) if echo else ""
    except ErllamaError as exc:
        raise from_engine(exc, {"text": "prompt", "tokens": "prompt"}) from exc
    return prompt, text


async def _events(
    state: ServerState,
    started: Sequence[Started],
    shape: Any,
    echoed: str,
    with_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """A streamed completion; several choices come in turn (see openai._chat_events)."""
    dones: list[Done] = []
    for one in started:
        i = one.index
        offset = len(echoed)
        if echoed:
            yield openai_event(shape(i, echoed, None))
        try:
            async with aclosing(pieces(state, one, "call_")) as parts:
                async for piece in parts:
                    if isinstance(piece, Text):
                        event = shape(i, piece.text, None)
                        if with_logprobs:
                            lp = completion_logprobs(piece.logprobs, offset)
                            event["choices"][0]["logprobs"] = lp
                        offset += len(piece.text)
                        yield openai_event(event)
                    elif isinstance(piece, End):
                        if piece.finish == "cancelled":
                            yield openai_event(error_body(cancelled_error(), "openai"))
                            return
                        last = shape(i, "", piece.finish)
                        last["erllama"] = extension(piece.done)
                        yield openai_event(last)
                        dones.append(piece.done)
        except Exception as exc:
            yield openai_event(stream_error(exc, one, "openai"))
            return
    for closing in closing_events(dones, lambda: shape(0, "", None), include_usage):
        yield closing
