"""Constrained output: a JSON schema (or "any JSON object") as a GBNF grammar.

llama-cpp-python ships a well-tested JSON-schema-to-GBNF converter
(``llama_cpp.llama_grammar``); erllama uses it rather than keep a second one, with one
method replaced: its object rule recursed once per optional property, so a flat schema of
1,000 optional properties failed with "maximum recursion depth exceeded" (the replacement
builds the same rules in a loop). It needs no model, only the ``llama`` extra; without it,
``response_format`` is not supported.

What a schema may ask for is bounded before the converter runs (:func:`check_schema`):
nodes, depth, repetition counts, and in ``pattern`` regexes the product of nested
repetitions and repetitions of something that can be empty, which make llama.cpp's grammar
sampler run for minutes per token (see :mod:`.grammar_cost`, which bounds the GBNF itself).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest, NotSupported
from .grammar_cost import MAX_NULLABLE_REPEAT

log = logging.getLogger("erllama.grammar")

__all__ = [
    "conversion_error",
    "schema_converter",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_DEPTH",
    "MAX_PATTERN_PRODUCT",
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
_PATTERN_REPEAT = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")
#: A ``pattern``: its length, how deep its groups nest (the converter parses it
#: recursively), and the product of nested repetition counts.
MAX_PATTERN_CHARS = 2048
MAX_PATTERN_DEPTH = 32
MAX_PATTERN_PRODUCT = 1 << 16


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
    param = "response_format.json_schema.schema"
    return _convert(schema, param)


def _convert(schema: Mapping[str, Any], param: str) -> str:
    """GBNF for a checked schema (InvalidRequest naming ``param`` when the converter
    cannot express it). The converter's own message is passed on only when it raised on
    purpose (ValueError, an assertion naming what it cannot do); anything else is a bug
    whose text means nothing to a client: logged, and a generic reason."""
    converter = schema_converter()
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "")
        return str(converter.format_grammar())
    except Exception as exc:
        raise conversion_error(exc, param, "cannot be turned into a grammar") from exc


def conversion_error(exc: Exception, param: str, what: str) -> InvalidRequest:
    """The error for a schema the converter failed on: its message when it raised on
    purpose (ValueError, an assertion naming what it cannot express), else ``what`` alone
    (a TypeError's text is a bug report, not something a client can act on; it is
    logged)."""
    if isinstance(exc, RecursionError):
        return InvalidRequest(param, f"{what} (it nests too deeply)")
    if isinstance(exc, ValueError | AssertionError | NotImplementedError | KeyError):
        reason = str(exc)
        if reason and len(reason) <= 300:
            return InvalidRequest(param, f"{what}: {reason}")
        return InvalidRequest(param, what)
    log.warning("JSON schema converter failed on %s", param, exc_info=exc)
    return InvalidRequest(param, what)


def schema_converter() -> Any:
    """A fresh llama-cpp-python ``SchemaConverter`` with erllama's iterative object rule
    (no remote ``$ref`` fetching). ImportError without the ``llama`` extra."""
    from llama_cpp import llama_grammar

    global _Converter
    if _Converter is None:
        _Converter = _make_converter(llama_grammar.SchemaConverter)
    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


_Converter: Any = None


def _make_converter(base: type) -> type:
    class Converter(base):  # type: ignore[misc]
        """llama-cpp-python's converter with an iterative object rule."""

        def _build_object_rule(
            self,
            properties: list[tuple[str, Any]],
            required: set[str],
            name: str,
            additional_properties: Any,
        ) -> str:
            # The same rules as SchemaConverter._build_object_rule, whose nested
            # get_recursive_refs recursed once per optional property.
            prefix = f"{name}{'-' if name else ''}"
            order = self._prop_order
            sorted_props = [
                kv[0]
                for _, kv in sorted(
                    enumerate(properties),
                    key=lambda ikv: (order.get(ikv[1][0], len(order)), ikv[0]),
                )
            ]
            kv_rules = {}
            for prop_name, prop_schema in properties:
                value_rule = self.visit(prop_schema, f"{prefix}{prop_name}")
                kv_rules[prop_name] = self._add_rule(
                    f"{prefix}{prop_name}-kv",
                    rf"{self._format_literal(json.dumps(prop_name))} space "
                    rf'":" space {value_rule}',
                )
            required_props = [k for k in sorted_props if k in required]
            optional_props = [k for k in sorted_props if k not in required]
            if additional_properties is True or isinstance(additional_properties, dict):
                sub = f"{prefix}additional"
                value_rule = self.visit(
                    {} if additional_properties is True else additional_properties,
                    f"{sub}-value",
                )
                kv_rules["*"] = self._add_rule(
                    f"{sub}-kv",
                    self._add_primitive("string", self._primitive_string())
                    + f' ":" space {value_rule}',
                )
                optional_props.append("*")
            rule = '"{" space ' + ' "," space '.join(kv_rules[k] for k in required_props)
            if optional_props:
                rule += " ("
                if required_props:
                    rule += ' "," space ( '
                # refs(i, first_optional) of the original, built from the last key back:
                # rest[i] names the rule for keys i.. with the first one optional.
                rest: dict[int, str] = {}
                for i in range(len(optional_props) - 1, 0, -1):
                    rest[i] = self._add_rule(
                        f"{prefix}{optional_props[i - 1]}-rest",
                        self._refs_from(optional_props, kv_rules, prefix, i, True, rest),
                    )
                rule += " | ".join(
                    self._refs_from(optional_props, kv_rules, prefix, i, False, rest)
                    for i in range(len(optional_props))
                )
                if required_props:
                    rule += " )"
                rule += " )?"
            rule += ' "}" space'
            return rule

        def _refs_from(
            self,
            keys: list[str],
            kv_rules: dict[str, str],
            prefix: str,
            i: int,
            first_optional: bool,
            rest: dict[int, str],
        ) -> str:
            k = keys[i]
            kv = kv_rules[k]
            res: str
            if k == "*":
                res = self._add_rule(f"{prefix}additional-kvs", f'{kv} ( "," space ' + kv + " )*")
            elif first_optional:
                res = f'( "," space {kv} )?'
            else:
                res = kv
            if i + 1 < len(keys):
                res += " " + rest[i + 1]
            return res

        @staticmethod
        def _primitive_string() -> Any:
            from llama_cpp import llama_grammar

            return llama_grammar.PRIMITIVE_RULES["string"]

    return Converter


def check_pattern(pattern: str, param: str) -> None:
    """Refuse a regex whose grammar would be too costly to run (InvalidRequest naming
    ``param``): longer than ``MAX_PATTERN_CHARS``, groups nested deeper than
    ``MAX_PATTERN_DEPTH``, a count above ``MAX_REPEAT``, nested counts whose product
    exceeds ``MAX_PATTERN_PRODUCT``, or a repetition of something that can be empty
    (``(a{0,2}){0,64}``) past ``grammar_cost.MAX_NULLABLE_REPEAT`` in all: the converter
    expands these into nested optional rules whose parse stacks llama.cpp's sampler
    explores combinatorially (``(a{0,512}){0,512}`` ran forever)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRequest(param, f"pattern is longer than {MAX_PATTERN_CHARS} characters")
    # One frame per open group: its alternatives, each a list of (nullable, product).
    stack: list[list[list[tuple[bool, int]]]] = [[[]]]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        seq = stack[-1][-1]
        if c == "\\":
            seq.append((False, 1))
            i += 2
            continue
        if c == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            seq.append((False, 1))
            i = j + 1
            continue
        if c == "(":
            if len(stack) > MAX_PATTERN_DEPTH:
                raise InvalidRequest(param, f"pattern nests groups deeper than {MAX_PATTERN_DEPTH}")
            stack.append([[]])
            i += 1
            if pattern.startswith("?:", i):
                i += 2
            continue
        if c == ")":
            if len(stack) == 1:
                raise InvalidRequest(param, "pattern has an unbalanced ')'")
            alts = stack.pop()
            nullable = any(all(n for n, _ in alt) for alt in alts)
            product = max((p for alt in alts for _, p in alt), default=1)
            stack[-1][-1].append((nullable, product))
            i += 1
            continue
        if c == "|":
            stack[-1].append([])
            i += 1
            continue
        quantifier = _PATTERN_REPEAT.match(pattern, i) if c == "{" else None
        if c in "*+?" or quantifier is not None:
            if not seq:
                raise InvalidRequest(param, f"pattern has a repetition of nothing at {i}")
            if quantifier is not None:
                lo_text, comma, hi_text = quantifier.groups()
                lo = int(lo_text or 0)
                hi = int(hi_text) if hi_text else (None if comma else lo)
                i = quantifier.end()
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                i += 1
            if i < len(pattern) and pattern[i] in "?+":
                i += 1  # lazy or possessive: the same language
            if max(lo, hi or 0) > MAX_REPEAT:
                raise InvalidRequest(
                    param, f"pattern repetition counts above {MAX_REPEAT} are not supported"
                )
            nullable, inner = seq[-1]
            count = hi if hi is not None else lo
            product = inner * count if count >= 2 else inner
            if product > MAX_PATTERN_PRODUCT:
                raise InvalidRequest(
                    param,
                    f"pattern nests repetitions whose counts multiply to {product} "
                    f"(at most {MAX_PATTERN_PRODUCT})",
                )
            if nullable and hi is not None and hi >= 2 and product > MAX_NULLABLE_REPEAT:
                raise InvalidRequest(
                    param,
                    f"pattern repeats something that can be empty (a total of {product} nested "
                    f"repeats, at most {MAX_NULLABLE_REPEAT}): the grammar's cost grows "
                    "combinatorially; make the repeated part non-empty (a{1,n}, not a{0,n})",
                )
            seq[-1] = (nullable or lo == 0, product)
            continue
        seq.append((c in "^$", 1))  # an anchor matches nothing; anything else a character
        i += 1
    if len(stack) != 1:
        raise InvalidRequest(param, "pattern has an unbalanced '('")


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
                check_pattern(pattern, param)
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
                raise InvalidRequest(param, "only local $ref ('#/...') is supported")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
