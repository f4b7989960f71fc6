"""Constrained output: a JSON schema (or "any JSON object") as a GBNF grammar.

llama-cpp-python ships a well-tested JSON-schema-to-GBNF converter
(``llama_cpp.llama_grammar``); erllama uses it rather than keep a second one. It needs no
model, only the ``llama`` extra; without it, ``response_format`` is not supported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest, NotSupported

__all__ = [
    "MAX_REPEAT",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_NODES",
    "check_schema",
    "response_format_grammar",
]

#: Bounds on a schema turned into a grammar: the converter's work (and the grammar's size)
#: grows with nodes, depth and repetition counts, and it runs where a request is checked.
MAX_SCHEMA_NODES = 4096
MAX_SCHEMA_DEPTH = 64
MAX_REPEAT = 512
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_PATTERN_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """GBNF for ``response_format``:

    * ``{"type": "text"}`` or None: no grammar;
    * ``{"type": "json_object"}``: any JSON object;
    * ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` (OpenAI's shape) or
      ``{"type": "json_schema", "schema": {...}}``: JSON matching the schema.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format", "must be a mapping with a 'type'")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    try:
        from llama_cpp import llama_grammar
    except ImportError:
        raise NotSupported("engine", "response_format (install erllama[llama])") from None
    if kind == "json_object":
        return str(llama_grammar.JSON_GBNF)
    if kind != "json_schema":
        raise InvalidRequest(
            "response_format.type", f"must be text, json_object or json_schema, got {kind!r}"
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else response_format.get("schema")
    if not isinstance(schema, Mapping):
        raise InvalidRequest("response_format.json_schema.schema", "must be a JSON schema object")
    check_schema(schema, "response_format.json_schema.schema")
    try:
        return str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter asserts on schemas it cannot express
        raise InvalidRequest(
            "response_format.json_schema.schema", f"cannot be turned into a grammar: {exc}"
        ) from exc


def check_schema(schema: Any, param: str) -> None:
    """Refuse a JSON schema the grammar converter would choke on (InvalidRequest naming
    ``param``): too many nodes, too deep, a repetition bound above ``MAX_REPEAT``, or a
    ``$ref`` outside the schema (remote schemas are never fetched)."""
    count = 0
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_SCHEMA_NODES:
            raise InvalidRequest(param, f"has more than {MAX_SCHEMA_NODES} nodes")
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(param, f"is nested deeper than {MAX_SCHEMA_DEPTH}")
        if isinstance(node, dict):
            for key in _REPEAT_KEYS:
                value = node.get(key)
                if isinstance(value, int | float) and value > MAX_REPEAT:
                    raise InvalidRequest(param, f"{key} above {MAX_REPEAT} is not supported")
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                for m in _PATTERN_REPEAT.finditer(pattern):
                    if any(g and int(g) > MAX_REPEAT for g in m.groups()):
                        raise InvalidRequest(
                            param, f"pattern repetitions above {MAX_REPEAT} are not supported"
                        )
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
                raise InvalidRequest(param, "only local $ref ('#/...') is supported")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
