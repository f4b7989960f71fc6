"""Grammars and schemas are judged before they run: what would wedge llama.cpp's grammar
sampler is refused, naming the parameter; what it handles is not.

The costly cases are the ones measured on SmolLM2 (see erllama.grammar_cost); the
real-model side (a refused wedge, and the per-step limit) is in
tests/real/test_grammar_real.py.
"""

from __future__ import annotations

import json

import pytest
from llama_cpp import llama_grammar

import erllama
from erllama.grammar import check_pattern, check_schema, response_format_grammar
from erllama.grammar_cost import MAX_EXPANDED, MAX_GRAMMAR_BYTES, check_grammar


def schema_grammar(schema: dict[str, object]) -> str:
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert grammar is not None
    return grammar


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= ("a"?){0,64}',
        'root ::= ("a"{0,2}){0,64}',
        'root ::= ("a"{0,256}){0,2}',
        'x ::= "a"{0,8}\nroot ::= x{0,8}',  # through a rule reference
        'root ::= ("a" | ""){0,100}',
        f'root ::= "a"{{0,{MAX_EXPANDED + 1}}}',
        "root ::= " + " ".join(['"a"'] * (MAX_GRAMMAR_BYTES // 4 + 1)),
        'root ::= ("a" ("b")',
        "root ::= other",
        'root ::= "a" ^',
        'x ::= "a"',
    ],
    ids=[
        "nullable-64",
        "nested-nullable",
        "nullable-inside",
        "via-reference",
        "empty-alternative",
        "expands",
        "long",
        "unbalanced",
        "undefined",
        "unreadable",
        "no-root",
    ],
)
def test_costly_or_broken_grammars_are_refused_naming_the_parameter(grammar: str) -> None:
    with pytest.raises(erllama.InvalidRequest) as err:
        check_grammar(grammar, "response_format")
    assert err.value.param == "response_format"


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= ("a"?){0,32}',
        'root ::= (("a"?){0,4}){0,8}',
        'root ::= ("a" | "aa"){0,512}',
        'root ::= ("a" "b"{0,128}){0,128}',
        'root ::= [a-z]+ # a comment\n  | "x" ( "y" )* <tok> .',
        str(llama_grammar.JSON_GBNF),
    ],
)
def test_grammars_llama_cpp_runs_well_pass(grammar: str) -> None:
    check_grammar(grammar)


def test_converter_output_for_large_legitimate_schemas_passes() -> None:
    array = {"type": "array", "maxItems": 512, "items": {"type": "string", "maxLength": 512}}
    check_grammar(schema_grammar(array))
    flat = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)}}
    check_schema(flat, "schema")
    check_grammar(schema_grammar(flat))


def test_a_flat_schema_of_a_thousand_optional_properties_converts() -> None:
    # The converter's object rule recursed once per optional property.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
    grammar = schema_grammar(schema)
    assert 'p999-kv ::= "\\"p999\\""' in grammar


def test_the_converter_gives_the_same_rules_as_llama_cpp_python() -> None:
    for schema in (
        {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}},
        {
            "type": "object",
            "properties": {"x": {"type": "string"}, "y": {"type": "boolean"}},
            "required": ["x"],
            "additionalProperties": {"type": "integer"},
        },
        {"type": "object", "properties": {"z": {"type": "number"}}, "additionalProperties": True},
    ):
        assert schema_grammar(schema) == llama_grammar.json_schema_to_gbnf(json.dumps(schema))


@pytest.mark.parametrize(
    "pattern",
    [
        "^(a{0,512}){0,512}$",  # the wedge: each bound within 512
        "^(a{0,128}){0,128}$",  # 41 s a request
        "^(a{0,2}){0,64}$",
        "^(a?){0,64}$",
        "^(x|){0,100}$",
        "^(ab{0,512}){0,512}$",
        "(" * 40 + "a" + ")" * 40,
        "a" * 3000,
        "^(a",
    ],
)
def test_costly_patterns_are_refused_naming_the_field(pattern: str) -> None:
    with pytest.raises(erllama.InvalidRequest) as err:
        check_schema({"type": "string", "pattern": pattern}, "response_format")
    assert err.value.param == "response_format"
    assert "pattern" in err.value.reason


@pytest.mark.parametrize(
    "pattern",
    [
        r"^[A-Z]{2}\d{4}$",
        r"^(\d{1,3}\.){3}\d{1,3}$",
        r"^([a-z0-9-]{1,63}\.){1,127}[a-z]{2,63}$",
        r"^(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$",
        "^(a{0,8}){0,4}$",
        "^(ab{0,128}){0,128}$",
        r"^[\]a-z]{0,64}$",
    ],
)
def test_ordinary_patterns_pass(pattern: str) -> None:
    check_pattern(pattern, "pattern")
