"""Constrained output: a JSON schema (or "any JSON object") as a GBNF grammar.

llama-cpp-python ships a well-tested JSON-schema-to-GBNF converter
(``llama_cpp.llama_grammar``); erllama uses it rather than keep a second one. It needs no
model, only the ``llama`` extra; without it, ``response_format`` is not supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest, NotSupported

__all__ = ["response_format_grammar"]


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
    try:
        return str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter asserts on schemas it cannot express
        raise InvalidRequest(
            "response_format.json_schema.schema", f"cannot be turned into a grammar: {exc}"
        ) from exc
