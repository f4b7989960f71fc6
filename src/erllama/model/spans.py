"""Thinking and tool-call spans, recognised across tokens whatever their tokenization.

A model's markers (``<think>``/``</think>``, ``<tool_call>``/``</tool_call>`` ...) are
matched on the text of the tokens the model emits, so a marker is recognised however the
model spells it: as one special token, as the several tokens the tokenizer would make of
it, or character by character under a grammar (the reference matched single tokens only,
and a token-sequence match misses the last two). While the text at the end of the output
could still be the start of a marker, :class:`SpanTracker` holds it back; when a marker
completes, the span changes; when it cannot, the text is released as content of the
current span. Marker text never leaks into the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import attrs

from ..config import DEFAULT_TOOL_CALL_MARKERS

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = ["Markers", "Span", "SpanTracker", "detect_markers", "markers_for"]

Span = Literal["text", "think", "tool", "payload"]


@attrs.frozen
class Markers:
    """One model's markers (empty: that feature is off), as UTF-8 text, plus the thinking
    end marker's tokens (the engine feeds them to close a span whose budget ran out)."""

    think_start: bytes = b""
    think_end: bytes = b""
    tool_start: bytes = b""
    tool_end: bytes = b""
    payload_start: bytes = b""
    payload_end: bytes = b""
    think_end_tokens: tuple[int, ...] = ()
    think_start_tokens: tuple[int, ...] = ()

    @property
    def thinking(self) -> bool:
        return bool(self.think_start and self.think_end)

    @property
    def tools(self) -> bool:
        return bool(self.tool_start and self.tool_end)


#: What the tracker reports: content of a span, a marker's own text (a tool call's text
#: includes its markers), or a span opening / closing.
Item = tuple[Literal["content", "marker", "open", "close"], Span, bytes]


class SpanTracker:
    """One request's position among spans (see the module docstring)."""

    __slots__ = ("_markers", "_pending", "_thinking", "span")

    def __init__(self, markers: Markers, *, thinking: bool, start: Span = "text") -> None:
        self._markers = markers
        self._thinking = thinking and markers.thinking
        self._pending = bytearray()
        self.span: Span = start

    def _candidates(self) -> list[tuple[bytes, Span]]:
        """Markers that may appear in the current span, with the span each leads to."""
        m = self._markers
        out: list[tuple[bytes, Span]]
        if self.span == "text":
            out = []
            if self._thinking:
                out.append((m.think_start, "think"))
            if m.tools:
                out.append((m.tool_start, "tool"))
            return out
        if self.span == "think":
            return [(m.think_end, "text")]
        if self.span == "tool":
            out = [(m.tool_end, "text")]
            if m.payload_start and m.payload_end:
                out.append((m.payload_start, "payload"))
            return out
        return [(m.payload_end, "tool")]

    def fork(self) -> SpanTracker:
        """A copy that can be fed ahead (a draft's tokens) without moving this one."""
        twin = SpanTracker(self._markers, thinking=self._thinking, start=self.span)
        twin._pending += self._pending
        return twin

    def feed(self, data: bytes) -> Iterator[Item]:
        """Account one token's text; yields what it released, in order."""
        pending = self._pending
        pending += data
        while pending:
            candidates = self._candidates()
            found: tuple[int, bytes, Span] | None = None
            for marker, to in candidates:
                at = pending.find(marker)
                if at >= 0 and (found is None or at < found[0]):
                    found = (at, marker, to)
            if found is not None:
                at, marker, to = found
                if at:
                    yield ("content", self.span, bytes(pending[:at]))
                del pending[: at + len(marker)]
                yield from self._switch(to, marker)
                continue
            keep = _held(pending, [c for c, _ in candidates])
            cut = len(pending) - keep
            if cut:
                yield ("content", self.span, bytes(pending[:cut]))
                del pending[:cut]
            return

    def _switch(self, to: Span, marker: bytes) -> Iterator[Item]:
        """Cross a marker. Tool markers belong to the tool call's text (inside the span);
        thinking markers to neither the thinking nor the answer."""
        before = self.span
        if before == "text":
            yield ("open", to, b"")
        owner: Span = "think" if "think" in (before, to) else "tool"
        yield ("marker", owner, marker)
        if to == "text":
            yield ("close", before, b"")
        self.span = to

    def close(self) -> Iterator[Item]:
        """The request ended: release what was held; close an open span."""
        if self._pending:
            yield ("content", self.span, bytes(self._pending))
            self._pending.clear()
        if self.span != "text":
            yield ("close", "tool" if self.span == "payload" else self.span, b"")
            self.span = "text"

    def force_close_thinking(self) -> Iterator[Item]:
        """The thinking budget ran out: held text counts as thinking, then the span ends
        (the caller feeds the end marker into the sequence)."""
        assert self.span == "think"
        if self._pending:
            yield ("content", "think", bytes(self._pending))
            self._pending.clear()
        yield ("close", "think", b"")
        self.span = "text"


def _held(pending: bytearray, markers: list[bytes]) -> int:
    """Length of the longest tail of ``pending`` that begins one of ``markers``."""
    longest = max((len(m) for m in markers), default=1) - 1
    for n in range(min(longest, len(pending)), 0, -1):
        tail = pending[-n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0


#: Marker pairs recognised in chat templates, most specific first.
KNOWN_THINKING = (("<think>", "</think>"), ("<thinking>", "</thinking>"))
KNOWN_TOOL_CALLS = (("<tool_call>", "</tool_call>"), ("<function_call>", "</function_call>"))


def detect_markers(template: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """The thinking and tool-call marker pairs a chat template names, if any."""
    think = next((p for p in KNOWN_THINKING if p[0] in template and p[1] in template), None)
    tool = next((p for p in KNOWN_TOOL_CALLS if p[0] in template and p[1] in template), None)
    return think, tool


def markers_for(
    config: ModelConfig,
    chat_template: str | None,
    tokenize: Callable[[str], Sequence[int]],
) -> Markers:
    """A model's thinking and tool-call markers: the config's, else the pairs its chat
    template names, else (tool calls only) Hermes' pair: what the engine tells a template
    without tool support to write, and what a forced call's grammar writes, so a call is a
    call whatever the config. ``detect_markers`` off: the config's only. Matched on text;
    the thinking markers' tokens are kept too (the engine feeds the end marker when a
    budget runs out, and spots a prompt that opens the span)."""
    tm, tc = config.thinking_markers, config.tool_call_markers
    think = (tm.start, tm.end) if tm else None
    tool = (tc.start, tc.end) if tc else None
    if config.detect_markers:
        found_think, found_tool = detect_markers(chat_template or "")
        think = think or found_think
        hermes = DEFAULT_TOOL_CALL_MARKERS
        tool = tool or found_tool or (hermes.start, hermes.end)

    def raw(text: str | None) -> bytes:
        return text.encode("utf-8") if text else b""

    return Markers(
        think_start=raw(think[0]) if think else b"",
        think_end=raw(think[1]) if think else b"",
        tool_start=raw(tool[0]) if tool else b"",
        tool_end=raw(tool[1]) if tool else b"",
        payload_start=raw(tc.payload_start) if tc else b"",
        payload_end=raw(tc.payload_end) if tc else b"",
        think_start_tokens=tuple(tokenize(think[0])) if think else (),
        think_end_tokens=tuple(tokenize(think[1])) if think else (),
    )
