"""What a request streams: its sampled tokens turned into events, on the model thread.

Per token: the span tracker (:mod:`.spans`) says whether it is answer text, thinking or part
of a tool call; answer text goes through the stop strings (:mod:`.stops`); each kind has its
own incremental UTF-8 decoder, so a character split across tokens is never emitted broken.
The end-of-generation token is never streamed (it is still in the KV and the context).

The tracker and the stop matcher hold back only what could still become a marker or a stop
string; what is held when the request ends is released by :meth:`Output.finish`.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from ..events import (
    Event,
    ThinkingDelta,
    ThinkingEnd,
    Token,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
)
from .spans import Markers, Span, SpanTracker
from .stops import StopMatcher

__all__ = ["Output", "PieceCache", "Signer"]


class PieceCache:
    """Token id -> its text bytes, computed once per token per model.

    The bytes of a token list are the concatenation of each token's bytes (the
    ``detokenize`` hook's contract), so a stream never detokenizes more than one new
    token, and a token seen before costs a dict lookup, not a native call and an allocation.
    """

    __slots__ = ("_detokenize", "_pieces")

    def __init__(self, detokenize: Callable[[int], bytes]) -> None:
        self._detokenize = detokenize
        self._pieces: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._detokenize(token)
        return piece


class Signer:
    """Signs thinking text: hex HMAC-SHA256 under the engine's key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()


def _decoder() -> Callable[..., str]:
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode


class Output:
    """One request's events (see the module docstring)."""

    def __init__(
        self,
        pieces: PieceCache,
        *,
        stops: Iterable[str] = (),
        markers: Markers | None = None,
        thinking: bool = False,
        thinking_budget: int | None = None,
        signer: Signer | None = None,
        start: Span = "text",
    ) -> None:
        self._pieces = pieces
        self._text = _decoder()
        stops = tuple(stops)
        self._stops = StopMatcher(stops) if stops else None
        wants_spans = markers is not None and (markers.tools or (thinking and markers.thinking))
        self._spans = (
            SpanTracker(markers, thinking=thinking, start=start)
            if wants_spans and markers is not None
            else None
        )
        self._markers = markers
        self._think = _decoder()
        self._think_bytes = bytearray()
        self._thought = 0
        self._budget = thinking_budget
        self._signer = signer
        self._tool = _decoder()
        self._tool_parts: list[str] = []
        self._last_text_id: int | None = None
        #: The last token fed (what a call cut off at the end is attributed to).
        self._last_id: int | None = None
        #: The log-probabilities of the token being turned into events (None: not asked).
        self._logprob: TokenLogprob | None = None
        self._top: tuple[TokenLogprob, ...] = ()
        #: The stop string that matched (the request must end now).
        self.stop_sequence: str | None = None
        #: Tokens the engine must feed into the sequence before it decodes again: a thinking
        #: span's end marker, when the budget ran out. Taken by the driver.
        self.insert: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        """Inside a tool call's syntax (not its payload): sample greedily, so the call's
        bytes are deterministic from a given prefix and replay to the same tokens."""
        return self._spans is not None and self._spans.span == "tool"

    def steady(self, greedy: bool, draft: Sequence[int]) -> int:
        """How many leading tokens of ``draft`` (tokens that would follow those fed so
        far) plain decoding would choose in the mode ``greedy``: each token's mode is
        :attr:`greedy` after the tokens before it. A draft is verified in one mode, so it
        is cut where a tool call's syntax starts or ends."""
        if self._spans is None:
            return len(draft)
        if self.greedy != greedy:
            return 0
        ahead = self._spans.fork()
        for n, token in enumerate(draft[:-1], 1):
            for _ in ahead.feed(self._pieces(token)):
                pass
            if (ahead.span == "tool") != greedy:
                return n
        return len(draft)

    def token(
        self,
        token: int,
        eog: bool,
        out: list[Event],
        logprob: float | None = None,
        top: tuple[tuple[int, float], ...] = (),
    ) -> bool:
        """Append the events for one sampled token to ``out``; True when a stop string
        matched (the request ends here). ``logprob`` and ``top``: the token's log-probability
        and its alternatives, when the request asked for them (answer tokens carry them)."""
        if eog:
            return False
        self._last_id = token
        piece = self._pieces(token)
        if logprob is not None:
            pieces = self._pieces
            self._logprob = TokenLogprob(token_id=token, piece=piece, logprob=logprob)
            self._top = tuple(
                TokenLogprob(token_id=t, piece=pieces(t), logprob=lp) for t, lp in top
            )
        if self._spans is None:
            return self._answer(piece, token, out)
        text = bytearray()
        thought = False
        for what, span, data in self._spans.feed(piece):
            if what == "content" and span == "text":
                text += data
            elif what == "content" and span == "think":
                self._thinking(data, out)
                thought = True
            else:
                self._other(what, span, data, out)
        if thought:
            self._count_thought(out)
        matched = bool(text) and self._answer(bytes(text), token, out)
        self._logprob, self._top = None, ()  # a thinking or tool-call token's: not kept
        return matched

    def finish(self, out: list[Event]) -> None:
        """The request ended: release what is held; close an open span.

        A tool call the request ended inside (``max_tokens``, a full context) is not a
        call: it gets no ``ToolCallEnd``, and its text, streamed so far as deltas, comes
        again as a last ``Token``: answer text, as a client must show it."""
        if self.stop_sequence is not None:
            return
        cut_call: str | None = None
        if self._spans is not None:
            inside_call = self._spans.span in ("tool", "payload")
            for what, span, data in self._spans.close():
                if what == "content" and span == "text":
                    self._answer(data, self._last_text_id, out)
                elif what == "content" and span == "think":
                    self._thinking(data, out)
                elif what == "close" and inside_call:
                    cut_call = self._cut_call(out)
                else:
                    self._other(what, span, data, out)
        if self._stops is not None:
            tail = self._text(self._stops.flush())
            if tail and self._last_text_id is not None:
                out.append(Token(text=tail, token_id=self._last_text_id))
        if cut_call:
            out.append(Token(text=cut_call, token_id=self._last_id or 0))

    # ---- the three kinds of output -------------------------------------------------------

    def _answer(self, data: bytes, token: int | None, out: list[Event]) -> bool:
        if token is None:
            return False
        self._last_text_id = token
        logprob, top = self._logprob, self._top
        self._logprob, self._top = None, ()  # one token's, never repeated on a flush
        stops = self._stops
        matched = False
        if stops is not None:
            data = stops.feed(data)
            if stops.matched is not None:
                self.stop_sequence = stops.matched
                matched = True
        out.append(Token(text=self._text(data), token_id=token, logprob=logprob, top_logprobs=top))
        return matched

    def _thinking(self, data: bytes, out: list[Event]) -> None:
        self._think_bytes += data
        text = self._think(data)
        if text:
            out.append(ThinkingDelta(text=text))

    def _count_thought(self, out: list[Event]) -> None:
        self._thought += 1
        spans = self._spans
        if self._budget is None or self._thought < self._budget or spans is None:
            return
        if spans.span != "think":
            return
        # Close the span in the model's own context: the driver feeds the end marker, so the
        # model goes on with an answer instead of thinking on as "answer" text.
        for what, span, data in spans.force_close_thinking():
            if what == "content":
                self._thinking(data, out)
            else:
                self._other(what, span, data, out)
        assert self._markers is not None
        self.insert = self._markers.think_end_tokens

    def _cut_call(self, out: list[Event]) -> str:
        """The text of the call the request ended inside (its last bytes streamed as a
        delta), the call forgotten."""
        rest = self._tool(b"", final=True)
        if rest:
            self._tool_parts.append(rest)
            out.append(ToolCallDelta(text=rest))
        text = "".join(self._tool_parts)
        self._tool_parts.clear()
        return text

    def _other(self, what: str, span: Span, data: bytes, out: list[Event]) -> None:
        """Tool-call content and markers, and spans opening and closing."""
        if what in ("content", "marker"):
            if span in ("tool", "payload"):
                text = self._tool(data)
                if text:
                    self._tool_parts.append(text)
                    out.append(ToolCallDelta(text=text))
        elif what == "open":
            if span == "think":
                self._think_bytes.clear()
            else:
                self._tool_parts.clear()
        elif span == "think":
            rest = self._think(b"", final=True)
            if rest:
                out.append(ThinkingDelta(text=rest))
            sig = self._signer(bytes(self._think_bytes)) if self._signer is not None else None
            out.append(ThinkingEnd(signature=sig))
        else:
            rest = self._tool(b"", final=True)
            if rest:
                self._tool_parts.append(rest)
                out.append(ToolCallDelta(text=rest))
            out.append(ToolCallEnd(text="".join(self._tool_parts)))
            self._tool_parts.clear()
