"""What constrains a reply's text, in the request fields OpenAI and llama-server clients
send: OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``), and
llama-server's ``response_format: {"type": "json_object", "schema": ...}``, top-level
``json_schema`` (a schema) and ``grammar`` (GBNF). All are enforced by a grammar (see
generation.py); a request gives one of them, and a grammar that does not parse is a 400
naming the field it came in.
"""

from __future__ import annotations

from typing import Any

import attrs

from .body import Fields

__all__ = ["Constraint", "constraint"]


@attrs.frozen
class Constraint:
    #: A ``response_format`` in OpenAI's form (None: none).
    response_format: dict[str, Any] | None = None
    #: A GBNF grammar given as it is.
    grammar: str | None = None
    #: The request field the grammar came from, for errors (the engine names ``grammar``).
    field: str = "response_format"


def _schema_format(schema: Fields) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"schema": schema.data}}


def _response_format(body: Fields) -> dict[str, Any] | None:
    rf = body.obj("response_format")
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.obj("schema")  # llama-server's: a JSON object of this schema
        return {"type": "json_object"} if schema is None else _schema_format(schema)
    if kind == "json_schema":
        spec = rf.obj("json_schema")
        if spec is None and rf.has("schema"):  # llama-server's flat form
            schema = rf.obj("schema")
        else:
            spec = rf.obj("json_schema", required=True)
            assert spec is not None
            schema = spec.obj("schema", required=True)
        assert schema is not None
        return _schema_format(schema)
    raise rf.bad("type", "must be text, json_object or json_schema")


def constraint(body: Fields) -> Constraint:
    """The one constraint a request gives (400 when it gives two)."""
    given = [
        name
        for name in ("response_format", "json_schema", "grammar")
        if body.get(name) is not None
        and not (name == "response_format" and _is_text(body.get(name)))
    ]
    if len(given) > 1:
        raise body.bad(
            given[1], f"give one of grammar, json_schema and response_format, not {given[0]} too"
        )
    schema = body.obj("json_schema")
    if schema is not None:
        return Constraint(response_format=_schema_format(schema), field="json_schema")
    grammar = body.text("grammar")
    if grammar is not None:
        if not grammar.strip():
            raise body.bad("grammar", "must not be empty")
        return Constraint(grammar=grammar, field="grammar")
    return Constraint(response_format=_response_format(body))


def _is_text(value: object) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"
