"""What every API shares: a chat request in neutral form, started on the engine, and its
events as API-neutral pieces.

Each API module parses its own wire shape into a :class:`ChatJob`, calls :func:`start`,
and turns :func:`pieces` (or :func:`collect`) into its own responses. Here the engine's
events become text, thinking and parsed tool calls with minted ids, and, when a reply held
calls, its exact text is stored under their ids (see toolcalls.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from typing import Any, Literal

import anyio
import attrs
from starlette.requests import Request

from ..errors import ErllamaError
from ..events import (
    CacheExplanation,
    Done,
    ThinkingDelta,
    ThinkingEnd,
    Token,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
)
from ..grammar import check_schema, response_format_grammar
from ..lifecycle import KeepAlive
from .errors import CONTEXT_LENGTH_EXCEEDED, ApiError, Dialect, error_body, from_engine, log_cause
from .metrics import Track
from .params import check_messages
from .port import EventStream
from .sse import (
    Interruption,
    StreamGuard,
    anthropic_event,
    ndjson_line,
    openai_event,
    unless_disconnected,
)
from .state import ServerState
from .toolcalls import ArgumentScanner, forced_call_grammar, mint_id, parse_call

__all__ = [
    "Call",
    "CallArguments",
    "CallStart",
    "ChatJob",
    "End",
    "Finish",
    "Piece",
    "Reply",
    "Started",
    "Text",
    "Thinking",
    "ThinkingStop",
    "LogprobEntry",
    "cancelled_error",
    "close",
    "close_all",
    "collect",
    "explanation_json",
    "extension",
    "keep_alive_of",
    "pieces",
    "reply_text",
    "replies_unless_disconnected",
    "reply_unless_disconnected",
    "start",
    "start_choices",
    "stream_error",
    "stream_guard",
]

log = logging.getLogger("erllama.server")

Finish = Literal["stop", "length", "tool_calls", "cancelled"]


@attrs.frozen(kw_only=True)
class ChatJob:
    """One chat request, whichever API it came through."""

    model: str
    #: ``{"role", "content"}`` with string content, ready for the chat template.
    messages: list[dict[str, str]]
    #: OpenAI-style function specs for the template (None: no tools).
    tools: list[dict[str, Any]] | None = None
    #: Each tool's parameters schema, by name.
    functions: Mapping[str, Mapping[str, Any] | None] = attrs.field(factory=dict)
    #: ``none`` (calls come back as text), ``auto``, or ``required`` (with ``forced``:
    #: that function).
    choice: Literal["none", "auto", "required"] = "auto"
    forced: str | None = None
    response_format: Mapping[str, Any] | None = None
    #: A GBNF grammar the request gave itself (llama-server's ``grammar``).
    grammar: str | None = None
    #: Engine keywords: max_tokens, temperature, top_p, top_k, seed, stop, thinking ...
    options: dict[str, Any] = attrs.field(factory=dict)
    #: API parameter names for the engine's (``prompt`` -> ``messages``).
    renames: Mapping[str, str] = attrs.field(factory=dict)
    #: The prompt's token ids when the API built them itself (a chained request continuing
    #: a previous context, a raw prompt); None: render ``messages`` with the template.
    prompt: Sequence[int] | None = None
    #: A context smaller than the model's the request must fit in, prompt and reply
    #: (Ollama's ``num_ctx``); ``renames["context_limit"]`` names it in errors.
    context_limit: int | None = None
    #: How long the model stays loaded once idle after this request (Ollama's
    #: ``keep_alive``, in seconds; None: for good); the model's own by default.
    keep_alive: float | KeepAlive | None = KeepAlive.DEFAULT
    #: ``erllama.explain_cache``: the response carries ``Stats.cache_explain``.
    explain_cache: bool = False

    @property
    def parses_calls(self) -> bool:
        return self.tools is not None and self.choice != "none"


@attrs.define(eq=False)
class Started:
    job: ChatJob
    stream: EventStream
    prompt_tokens: int
    track: Track
    #: The guard's id of the HTTP request (named in a 5xx error event and its log line).
    request_id: str | None = None
    #: A forced call on a model whose calls the engine does not mark (``detect_markers``
    #: off, no markers configured): the grammar makes the whole reply the call, so the
    #: reply is parsed as one when it ends.
    parse_whole: bool = False
    #: Which of the request's choices this is (``n``).
    index: int = 0


#: One answer token's log-probability and its alternatives (``logprobs`` requests).
LogprobEntry = tuple[TokenLogprob, tuple[TokenLogprob, ...]]


@attrs.frozen
class Text:
    text: str
    #: The log-probabilities of the tokens that released this text (``logprobs``
    #: requests; a token whose text is held, as a stop string's may be, comes with the
    #: next text).
    logprobs: tuple[LogprobEntry, ...] = ()


@attrs.frozen
class Thinking:
    text: str


@attrs.frozen
class ThinkingStop:
    signature: str | None


@attrs.frozen
class Call:
    id: str
    name: str
    arguments: Mapping[str, Any]
    #: The arguments as the model wrote them (its exact bytes when it wrote an object).
    arguments_json: str
    #: Streamed already as :class:`CallStart` and :class:`CallArguments` pieces.
    streamed: bool = False


@attrs.frozen
class CallStart:
    """A call's name is known and its arguments began (streams that asked for it)."""

    id: str
    name: str


@attrs.frozen
class CallArguments:
    """More of a streaming call's arguments, exactly as the model writes them."""

    id: str
    text: str


@attrs.frozen
class End:
    done: Done
    finish: Finish


Piece = Text | Thinking | ThinkingStop | Call | CallStart | CallArguments | End


def _grammar(state: ServerState, job: ChatJob) -> str | None:
    constrained = job.response_format is not None and job.response_format.get("type") != "text"
    if job.grammar is not None and constrained:
        raise ApiError.bad_param(
            job.renames.get("grammar", "grammar"),
            "give one of grammar, json_schema and response_format",
        )
    if job.choice == "required" and job.tools is not None:
        if constrained or job.grammar is not None:
            raise ApiError.bad_param(
                "tool_choice", "a forced tool call cannot be combined with response_format"
            )
        names = [job.forced] if job.forced is not None else list(job.functions)
        tools = [(n, job.functions.get(n)) for n in names]
        return forced_call_grammar(state.markers(job.model), tools)
    if job.grammar is not None:
        return job.grammar  # the engine parses it and bounds its cost (a 400 naming it)
    rf = job.response_format
    if rf is not None:
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else rf.get("schema")
        if schema is not None:
            check_schema(schema, job.renames.get("response_format", "response_format"))
        return response_format_grammar(rf)
    return None


def _within(job: ChatJob, options: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """The job's engine options, the reply capped to what ``context_limit`` leaves."""
    limit = job.context_limit
    if limit is None:
        return options
    room = limit - prompt_tokens
    if room < 1:
        err = ApiError.bad_param(
            job.renames.get("context_limit", "context_limit"),
            f"the prompt is {prompt_tokens} tokens, which leaves no room in {limit}",
        )
        err.code = CONTEXT_LENGTH_EXCEEDED
        raise err
    asked = options.get("max_tokens")
    return {**options, "max_tokens": room if asked is None else min(asked, room)}


def keep_alive_of(
    options: dict[str, Any], default: float | KeepAlive | None = KeepAlive.DEFAULT
) -> tuple[float | KeepAlive | None, dict[str, Any]]:
    """A request's ``erllama.keep_alive`` (see params.extension_options), and its engine
    options without it."""
    if "keep_alive" not in options:
        return default, options
    rest = dict(options)
    return rest.pop("keep_alive"), rest


async def start(
    state: ServerState, job: ChatJob, track: Track, request_id: str | None = None
) -> Started:
    """Render the prompt and queue the request; ApiError (404, 429, 503, 400 naming the
    parameter) before anything runs. The model is loaded first if it is not."""
    return (await start_choices(state, job, track, request_id, 1))[0]


#: Seeds are 32-bit: choice i of a seeded request runs with ``(seed + i) mod 2**32``.
_SEEDS = 2**32


async def start_choices(
    state: ServerState, job: ChatJob, track: Track, request_id: str | None, n: int
) -> list[Started]:
    """Render the prompt once and queue ``n`` requests for it (``n`` choices), back to
    back: each ``infer`` returns once its request is queued, so all n are queued before
    any is waited for, and a scheduler that shares a prompt's prefill between requests
    admitted together (issue 22) prefills it once. With a ``seed``, choice i runs with
    ``seed + i``, so each choice can be reproduced alone. ApiError before anything runs;
    a later request refused (a full queue) cancels those queued before it."""
    keep_alive, engine_options = keep_alive_of(job.options, job.keep_alive)
    await state.use_model(job.model, keep_alive)
    check_messages(job.messages, state)
    engine = state.engine
    renames = dict(job.renames)
    if job.choice == "required" and job.tools is not None:
        renames["grammar"] = "tool_choice"  # the grammar is the forced call's
    streams: list[EventStream] = []
    try:
        # Off the loop: converting a large schema takes a while (bounded by check_schema).
        grammar = await anyio.to_thread.run_sync(_grammar, state, job)
        prompt = job.prompt
        if prompt is None:
            prompt = await engine.apply_chat_template(job.model, job.messages, None, job.tools)
        options = _within(job, engine_options, len(prompt))
        for i in range(n):
            streams.append(
                await engine.infer(job.model, prompt, grammar=grammar, **_seeded(options, i))
            )
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()
        if isinstance(exc, ErllamaError):
            raise from_engine(exc, renames) from exc
        raise
    parse_whole = job.choice == "required" and job.tools is not None
    parse_whole = parse_whole and not state.matches_calls(job.model)
    return [
        Started(
            job=job,
            stream=stream,
            prompt_tokens=len(prompt),
            track=track,
            request_id=request_id,
            parse_whole=parse_whole,
            index=i,
        )
        for i, stream in enumerate(streams)
    ]


def _seeded(options: dict[str, Any], index: int) -> dict[str, Any]:
    seed = options.get("seed")
    if index == 0 or not isinstance(seed, int) or not 0 <= seed < _SEEDS:
        return options  # (a bad seed fails on the first choice, named)
    return {**options, "seed": (seed + index) % _SEEDS}


async def pieces(
    state: ServerState, started: Started, call_prefix: str, *, stream_calls: bool = False
) -> AsyncGenerator[Piece, None]:
    """The request's events as pieces, ending with :class:`End`. Tool calls come whole,
    when they close; with ``stream_calls`` a call also streams before it closes, as a
    :class:`CallStart` once its name is read and :class:`CallArguments` as its arguments
    arrive (their concatenation is exactly the arguments object the model wrote), and its
    :class:`Call` is then marked ``streamed``. A backend failure raises ApiError (503)."""
    job, stream, track = started.job, started.stream, started.track
    raw: list[str] = []  # the reply as generated, for replies the engine cannot give back
    calls: list[str] = []
    open_call: list[str] = []  # deltas of a call not closed yet
    held: list[LogprobEntry] = []  # log-probabilities of tokens whose text is held
    scanner = ArgumentScanner()  # the open call's name and arguments as they arrive
    streaming: str | None = None  # the id of the open call, once it streams
    try:
        async for ev in stream:
            if isinstance(ev, Token) and started.parse_whole:
                raw.append(ev.text)
                track.first_token()
            elif isinstance(ev, Token):
                if open_call:
                    # The request ended inside a call: the engine hands its text back as
                    # answer text (already in ``raw``, as deltas). One that streamed as a
                    # call stays one, cut short: the client has it already.
                    open_call.clear()
                    if streaming is not None:
                        scanner, streaming = ArgumentScanner(), None
                        continue
                else:
                    raw.append(ev.text)
                if ev.logprob is not None:
                    held.append((ev.logprob, ev.top_logprobs))
                if ev.text:
                    track.first_token()
                    yield Text(ev.text, tuple(held))
                    held.clear()
            elif isinstance(ev, ThinkingDelta):
                track.first_token()
                yield Thinking(ev.text)
            elif isinstance(ev, ThinkingEnd):
                yield ThinkingStop(ev.signature)
            elif isinstance(ev, ToolCallDelta):
                raw.append(ev.text)
                open_call.append(ev.text)
                track.first_token()
                fresh = scanner.feed(ev.text) if job.parses_calls else ""
                if stream_calls and scanner.started:
                    if streaming is None:
                        streaming = mint_id(call_prefix)
                        yield CallStart(streaming, scanner.name or "")
                    if fresh:
                        yield CallArguments(streaming, fresh)
            elif isinstance(ev, ToolCallEnd):
                open_call.clear()
                call = _call(ev.text, scanner, streaming, call_prefix) if job.parses_calls else None
                scanner, streaming = ArgumentScanner(), None
                if call is None:
                    yield Text(ev.text)
                    continue
                calls.append(call.id)
                yield call
            elif isinstance(ev, Done):
                if started.parse_whole and raw:
                    whole = "".join(raw)
                    whole_scan = ArgumentScanner()
                    whole_scan.feed(whole)
                    call = _call(whole, whole_scan, None, call_prefix)
                    if call is None:
                        yield Text(whole)
                    else:
                        calls.append(call.id)
                        yield call
                if calls:
                    reply = await reply_text(state, job.model, ev, raw)
                    await state.store.remember(job.model, calls, reply)
                finish: Finish
                if ev.finish_reason == "cancelled":
                    finish = "cancelled"
                elif calls and ev.finish_reason == "stop":
                    finish = "tool_calls"
                else:
                    finish = ev.finish_reason
                track.finished(finish, ev.stats)  # counts the miss's cause either way
                if not job.explain_cache:
                    ev = attrs.evolve(ev, stats=attrs.evolve(ev.stats, cache_explain=None))
                yield End(ev, finish)
                return
    except ErllamaError as exc:
        raise from_engine(exc, job.renames) from exc


def _call(
    text: str, scanner: ArgumentScanner, streamed: str | None, call_prefix: str
) -> Call | None:
    """The call one closed ``ToolCallEnd`` text holds, its arguments in the model's own
    bytes when it wrote an object; None when it is none (the text is then answer text). A
    call that streamed already is a call whatever its text: the client has its start."""
    parsed = parse_call(text)
    exact = scanner.arguments
    if parsed is None:
        if streamed is None:
            return None
        return Call(streamed, scanner.name or "", {}, exact or "", streamed=True)
    if exact is None or scanner.name != parsed.name:
        exact = parsed.arguments_json
    call_id = streamed or mint_id(call_prefix)
    return Call(call_id, parsed.name, parsed.arguments, exact, streamed=streamed is not None)


async def reply_text(state: ServerState, model: str, done: Done, raw: Sequence[str]) -> str:
    """The reply exactly as the model generated it: the text of its token ids (thinking,
    markers and any stop string included), which is what the engine remembers for exact
    replay. If the model went away meanwhile, the streamed text in order."""
    if done.reply_text is not None:
        return done.reply_text
    try:
        return await state.engine.detokenize(model, done.token_ids)
    except ErllamaError:
        return "".join(raw)


@attrs.define
class Reply:
    """A whole reply, for non-streaming responses: pieces in order (text merged)."""

    blocks: list[Text | Thinking | Call] = attrs.Factory(list)
    signature: str | None = None
    end: End | None = None
    #: Every answer token's log-probabilities, in order (``logprobs`` requests).
    logprobs: list[LogprobEntry] = attrs.Factory(list)

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.blocks if isinstance(b, Text))

    @property
    def thinking(self) -> str:
        return "".join(b.text for b in self.blocks if isinstance(b, Thinking))

    @property
    def calls(self) -> list[Call]:
        return [b for b in self.blocks if isinstance(b, Call)]


async def collect(state: ServerState, started: Started, call_prefix: str) -> Reply:
    reply = Reply()
    async with aclosing(pieces(state, started, call_prefix)) as parts:
        async for piece in parts:
            if isinstance(piece, End):
                reply.end = piece
            elif isinstance(piece, CallStart | CallArguments):
                continue  # (only streams ask for them)
            elif isinstance(piece, ThinkingStop):
                reply.signature = piece.signature
            elif isinstance(piece, Text) and reply.blocks and isinstance(reply.blocks[-1], Text):
                reply.blocks[-1] = Text(reply.blocks[-1].text + piece.text)
                reply.logprobs += piece.logprobs
            elif isinstance(piece, Text):
                reply.blocks.append(Text(piece.text))
                reply.logprobs += piece.logprobs
            elif (
                isinstance(piece, Thinking)
                and reply.blocks
                and isinstance(reply.blocks[-1], Thinking)
            ):
                reply.blocks[-1] = Thinking(reply.blocks[-1].text + piece.text)
            else:
                reply.blocks.append(piece)
    return reply


def extension(done: Done) -> dict[str, Any]:
    """erllama's own facts about a finished request (the ``erllama`` response field); with
    ``erllama.explain_cache``, why its prompt was restored as far as it was."""
    st = done.stats
    cache: dict[str, Any] = {
        "hit_kind": st.cache_hit_kind,
        "tokens_restored": st.cache_delta.read,
        "tokens_saved": st.cache_delta.created,
    }
    if st.cache_explain is not None:
        cache["explain"] = explanation_json(st.cache_explain)
    return {
        "cache": cache,
        "finish_key": st.finish_key,
        "seed": st.seed,
        "stop_sequence": st.stop_sequence,
        "time_to_first_token_s": st.time_to_first_token_s,
        # Where the time to the first token went (seconds): the queue, the cache lookup and
        # restore, a wait for another request's prefill of a shared prefix, the prefill.
        "timings": {
            "queued_s": st.queued_s,
            "setup_s": st.setup_s,
            "shared_wait_s": st.shared_wait_s,
            "prefill_s": st.prefill_s,
        },
        # Speculative decoding (0 and 0 without it): llama-server reports these two as
        # ``timings.draft_n`` and ``draft_n_accepted``.
        "speculative": {"draft_tokens": st.draft_tokens, "accepted": st.draft_accepted},
    }


def explanation_json(ex: CacheExplanation) -> dict[str, Any]:
    """A :class:`~erllama.events.CacheExplanation` as JSON (every field, ids as arrays)."""
    return attrs.asdict(ex)


def cancelled_error() -> ApiError:
    """A request the engine ended before it finished (its model was unloaded, or the
    server is stopping)."""
    return ApiError(
        503,
        "unavailable",
        "the request was cancelled: its model was unloaded or the server is stopping",
        code="cancelled",
    )


async def close(started: Started, interrupted: Interruption | None = None) -> None:
    """A stream's cleanup: cancel the request in the model (when it has not ended) and
    record how it ended."""
    try:
        await started.stream.aclose()
    finally:  # recorded however closing went
        if interrupted == "stalled":
            started.track.end("stalled")
        elif interrupted == "stopping":
            started.track.end("cancelled")
        else:
            started.track.end_with(None)


def stream_guard(
    state: ServerState, dialect: Dialect, error_event: Callable[[ApiError], str] | None = None
) -> StreamGuard:
    """The bounds of one event stream on this server, with ``dialect``'s error event (or
    ``error_event``, for a stream with its own shape, as the Responses API's)."""
    if error_event is None:
        if dialect == "ollama":
            error_event = lambda err: ndjson_line(error_body(err, dialect))  # noqa: E731
        else:
            encode = anthropic_event if dialect == "anthropic" else openai_event
            error_event = lambda err: encode(error_body(err, dialect))  # noqa: E731
    return StreamGuard(
        stopping=state.stopping,
        buffer_bytes=state.config.server.stream_buffer_bytes,
        error_event=error_event,
    )


async def reply_unless_disconnected(
    request: Request, state: ServerState, started: Started, call_prefix: str
) -> Reply | None:
    """The whole reply, or None when the client went away first (the request is then
    cancelled in the model). A reply the engine cancelled is a 503."""

    async def work() -> Reply:
        async with started.stream:
            return await collect(state, started, call_prefix)

    try:
        reply = await unless_disconnected(request, work)
    except BaseException as exc:
        started.track.end_midway(exc)
        raise
    if reply is None:
        started.track.end("disconnected")
        return None
    assert reply.end is not None
    if reply.end.finish == "cancelled":
        raise cancelled_error()
    return reply


async def replies_unless_disconnected(
    request: Request, state: ServerState, started: Sequence[Started], call_prefix: str
) -> list[Reply] | None:
    """Every choice's whole reply (see :func:`reply_unless_disconnected`). Collected one
    after another: the requests run together in the model, so the last one read is ready
    about when the first is; one that fails cancels the rest."""
    if len(started) == 1:
        one = await reply_unless_disconnected(request, state, started[0], call_prefix)
        return None if one is None else [one]

    async def work() -> list[Reply]:
        async with AsyncExitStack() as stack:
            for s in started:
                await stack.enter_async_context(s.stream)
            return [await collect(state, s, call_prefix) for s in started]

    track = started[0].track
    try:
        replies = await unless_disconnected(request, work)
    except BaseException as exc:
        track.end_midway(exc)
        raise
    if replies is None:
        track.end("disconnected")
        return None
    if any(r.end is None or r.end.finish == "cancelled" for r in replies):
        raise cancelled_error()
    return replies


async def close_all(started: Sequence[Started], interrupted: Interruption | None = None) -> None:
    """A stream's cleanup for several choices: each request cancelled (when it has not
    ended), the outcome recorded once."""
    for s in started[1:]:
        await s.stream.aclose()
    await close(started[0], interrupted)


def stream_error(exc: Exception, started: Started, dialect: Dialect) -> dict[str, Any]:
    """The error event's body for a failure after the response began (its status is
    sent); a server-side failure is logged with its cause and the request id, which the
    event names."""
    started.track.end_midway(exc)
    rid = started.request_id
    if isinstance(exc, ApiError):
        err = exc
    elif isinstance(exc, ErllamaError):
        err = from_engine(exc, started.job.renames)
    else:
        log.exception("request %s failed while streaming", rid, exc_info=exc)
        err = ApiError(500, "internal", "internal error")
    if err.status >= 500:
        log_cause(err, rid)
    return error_body(err, dialect, rid)
