"""Tool calls over HTTP: minted ids, the exact replies they came from, parsing, forcing.

An agent sends its history back every turn, the model's tool calls included, as structured
data (OpenAI ``tool_calls``, Anthropic ``tool_use`` blocks). Re-serialising that data would
not give back the bytes the model generated, and the cached prefix would stop matching
there. So the server mints an id for every call and keeps, per id, the exact text of the
whole reply that held it (:class:`ToolCallStore`); when a later request's assistant message
names known ids, that text is rendered instead, and the engine splices the reply's own
token ids back in (see docs/tool-calls.md). With the cache's file tiers the map is kept
beside the rows too, so it survives a restart. Unknown ids (another server) get
:func:`fallback_text`: the same Hermes format, deterministic.

A request that must call a tool (``tool_choice`` ``required``, a named function, Anthropic's
``any``/``tool``) gets a grammar that admits exactly one call in the Hermes format,
``<tool_call>{"name":"<fn>","arguments":<JSON object>}</tool_call>``, its arguments
constrained by the function's JSON schema (:func:`forced_call_grammar`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio
import attrs

from ..cache.records import RecordStore
from ..config import ToolCallMarkers
from ..errors import NotSupported
from ..grammar import conversion_error, schema_converter

__all__ = [
    "ArgumentScanner",
    "DEFAULT_MARKERS",
    "ParsedCall",
    "ToolCallStore",
    "fallback_text",
    "forced_call_grammar",
    "mint_id",
    "parse_call",
]

#: Hermes-style markers, for models whose config names none.
DEFAULT_MARKERS = ToolCallMarkers(start="<tool_call>", end="</tool_call>")
#: Function names both APIs accept.
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

#: Limits on a JSON schema turned into a grammar: the converter writes a bounded repetition
#: out in full (``maxItems: 10**9`` would never finish), and walks every node.


def mint_id(prefix: str) -> str:
    """A fresh, unguessable tool-call id (``call_...`` for OpenAI, ``toolu_...`` for
    Anthropic)."""
    return prefix + secrets.token_urlsafe(18)


class ToolCallStore:
    """Tool-call id -> the exact text of the reply that made it, at most ``entries`` ids,
    least recently used dropped first. Every call of one reply maps to the same text.

    With ``records`` (the cache's file tiers) each id is also kept beside the rows, so a
    restart, or another replica sharing the cache directory, still renders it exactly: an
    id not in memory is looked up there (one small file read). Event loop only."""

    def __init__(
        self, entries: int, longest: int = 256 * 1024, records: RecordStore | None = None
    ) -> None:
        self._entries = entries
        self._longest = longest
        self._replies: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._records = records

    def __len__(self) -> int:
        return len(self._replies)

    async def remember(self, model_id: str, ids: Iterable[str], reply: str) -> None:
        if len(reply) > self._longest:
            return
        ids = list(ids)
        for call_id in ids:
            self._learn(call_id, (model_id, reply))
        records = self._records
        if records is not None and ids:
            value = model_id.encode("utf-8") + b"\0" + reply.encode("utf-8")

            def put() -> None:
                for call_id in ids:
                    records.put(call_id.encode("utf-8"), value)

            await anyio.to_thread.run_sync(put)

    def _learn(self, call_id: str, entry: tuple[str, str]) -> None:
        self._replies[call_id] = entry
        self._replies.move_to_end(call_id)
        while len(self._replies) > self._entries:
            self._replies.popitem(last=False)

    def _recall(self, call_id: str) -> tuple[str, str] | None:
        entry = self._replies.get(call_id)
        if entry is not None or self._records is None:
            return entry
        raw = self._records.get(call_id.encode("utf-8"))
        model, sep, reply = (raw or b"").partition(b"\0")
        if not sep:
            return None
        try:
            entry = (model.decode("utf-8"), reply.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        self._learn(call_id, entry)
        return entry

    def reply_for(self, model_id: str, ids: Sequence[str]) -> str | None:
        """The reply text when every id is known, for this model, and all came from one
        reply; else None (render the fallback)."""
        if not ids:
            return None
        found = {self._recall(i) for i in ids}
        if len(found) != 1:
            return None
        (entry,) = found
        if entry is None or entry[0] != model_id:
            return None
        for call_id in ids:
            self._replies.move_to_end(call_id)
        return entry[1]


@attrs.frozen(kw_only=True)
class ParsedCall:
    name: str
    #: The arguments as a JSON object.
    arguments: Mapping[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def parse_call(text: str) -> ParsedCall | None:
    """The call in one ``ToolCallEnd`` text (markers included): the JSON object between
    the markers, with ``name`` and ``arguments`` (or ``parameters``). None when it is not
    one; the server then returns the text as answer text."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ParsedCall(name=name, arguments=args)


def fallback_text(markers: ToolCallMarkers, name: str, arguments: Any) -> str:
    """How a call whose exact reply is unknown is rendered: the forced grammar's format,
    compact JSON (``arguments`` given as a JSON string is parsed first when it can be)."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError, RecursionError):
            arguments = json.loads(arguments)
    body = json.dumps(
        {"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":")
    )
    return f"{markers.start}{body}{markers.end}"


def _literal(text: str) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are GBNF literal escapes too.
    return json.dumps(text, ensure_ascii=False)


def forced_call_grammar(
    markers: ToolCallMarkers, tools: Sequence[tuple[str, Mapping[str, Any] | None]]
) -> str:
    """GBNF admitting exactly one call of one of ``tools`` (name, parameters schema):
    ``<start>{"name":"<fn>","arguments":<object>}<end>``. Schemas were checked with
    :func:`check_schema`; one the converter cannot express raises InvalidRequest."""
    try:
        conv = schema_converter()
    except ImportError:
        raise NotSupported("engine", "tool_choice (install erllama[llama])") from None
    alternatives = []
    for i, (name, params) in enumerate(tools):
        schema: Any = copy.deepcopy(dict(params)) if params else {"type": "object"}
        if schema.get("type") is None and "properties" in schema:
            schema["type"] = "object"
        try:
            # A per-tool url keeps two tools' local $refs apart.
            schema = conv.resolve_refs(schema, f"tool{i}")
            args_rule = conv.visit(schema, f"tool{i}-arguments")
        except Exception as exc:  # the converter asserts on schemas it cannot express
            what = f"the parameters of {name!r} cannot be turned into a grammar"
            raise conversion_error(exc, "tools", what) from exc
        head = _literal('{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":')
        alternatives.append(f'{head} {args_rule} "}}"')
    call = " | ".join(f"( {a} )" for a in alternatives)
    root = f"root ::= {_literal(markers.start)} ( {call} ) {_literal(markers.end)}"
    return root + "\n" + str(conv.format_grammar())


class ArgumentScanner:
    """A Hermes-style call's name and arguments while its text streams in, so the
    arguments can be streamed as the model writes them (OpenAI ``arguments`` deltas,
    Anthropic ``input_json_delta``): the concatenation of what :meth:`feed` returns is
    exactly the bytes of the ``arguments`` (or ``parameters``) object in the model's text.

    It follows the JSON's top-level keys as characters arrive (strings and escapes, nesting
    depth); the arguments stream once the call's ``name`` is read and its arguments began
    as an object. Arguments given as a JSON string (some models write them so) do not
    stream: they come whole with the call, decoded.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._key: list[str] | None = None  # the top-level key being read
        self._last_key: str | None = None
        self._expect_value = False
        self._value: list[str] | None = None  # the name's string being read
        self._args: list[str] | None = None  # the arguments object so far
        self._args_depth = 0
        self._args_done = False
        self._sent = 0  # characters of the arguments handed out so far

    @property
    def started(self) -> bool:
        """The name is known and the arguments began: the call streams."""
        return self.name is not None and self._args is not None

    @property
    def arguments(self) -> str | None:
        """The arguments object's exact text, once it closed."""
        return "".join(self._args) if self._args is not None and self._args_done else None

    def feed(self, text: str) -> str:
        """Account ``text``; returns the arguments' new characters (once streaming)."""
        for ch in text:
            self._char(ch)
        if not self.started or self._args is None:
            return ""
        whole = "".join(self._args)
        out, self._sent = whole[self._sent :], len(whole)
        return out

    def _char(self, ch: str) -> None:
        if self._args is not None and not self._args_done:
            self._args.append(ch)
            self._track_args(ch)
            return
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self._end_string()
                return
            target = self._key if self._key is not None else self._value
            if target is not None:
                target.append(ch)
            return
        if ch == '"':
            self._in_string = True
            if self._depth == 1 and not self._expect_value:
                self._key = []
            elif self._depth == 1 and self._last_key == "name":
                self._value = []
            return
        if ch == "{":
            if self._depth == 1 and self._expect_value and self._last_key in _ARG_KEYS:
                self._args, self._args_depth = ["{"], 1
                self._expect_value = False
                return
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        elif ch == "[":
            self._depth += 1
        elif ch == ":" and self._depth == 1:
            self._expect_value = True
        elif ch == "," and self._depth == 1:
            self._expect_value = False

    def _end_string(self) -> None:
        if self._key is not None:
            self._last_key, self._key = "".join(self._key), None
        elif self._value is not None:
            if self.name is None:
                self.name = "".join(self._value)
            self._value = None
            self._expect_value = False
        else:
            self._expect_value = False

    def _track_args(self, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._args_depth += 1
        elif ch in "}]":
            self._args_depth -= 1
            if self._args_depth == 0:
                self._args_done = True


#: The keys a Hermes-style call's arguments come under.
_ARG_KEYS = ("arguments", "parameters")
