"""The stub backend's grammar: a small GBNF subset that really constrains output.

String literals, alternation, sequences, groups and rule references, without recursion: a
grammar is expanded into the finite list of strings it accepts, and the stub samples only
tokens that keep its output a prefix of one of them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["expand", "parse_gbnf"]

_GBNF_TOKEN = re.compile(r'\s*(?:(::=)|("(?:[^"\\]|\\.)*")|([A-Za-z][A-Za-z0-9_-]*)|([|()]))')


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt in ("x", "u"):
            width = 2 if nxt == "x" else 4
            out.append(chr(int(body[i + 2 : i + 2 + width], 16)))
            i += 2 + width
        else:
            raise ValueError(f"unknown escape \\{nxt}")
    return "".join(out)


def parse_gbnf(text: str) -> dict[str, list[list[Any]]]:
    """rule -> alternatives -> sequence of ``("lit", str)`` / ``("ref", name)`` / ``("grp", alts)``."""
    rules: dict[str, list[list[Any]]] = {}
    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    toks: list[tuple[str, str]] = []
    for line in lines:
        pos = 0
        while pos < len(line):
            if not line[pos:].strip():
                break
            m = _GBNF_TOKEN.match(line, pos)
            if not m:
                raise ValueError(f"unexpected text at {line[pos:].strip()[:20]!r}")
            pos = m.end()
            if m.group(1):
                toks.append(("def", "::="))
            elif m.group(2):
                toks.append(("lit", _unescape(m.group(2)[1:-1])))
            elif m.group(3):
                toks.append(("name", m.group(3)))
            else:
                toks.append(("op", m.group(4)))
    i = 0

    def alts(stop: set[str]) -> list[list[Any]]:
        nonlocal i
        out: list[list[Any]] = [[]]
        while i < len(toks):
            kind, val = toks[i]
            if kind == "name" and i + 1 < len(toks) and toks[i + 1][0] == "def":
                break  # next rule starts
            if kind == "op" and val in stop:
                break
            i += 1
            if kind == "lit":
                out[-1].append(("lit", val))
            elif kind == "name":
                out[-1].append(("ref", val))
            elif val == "|":
                out.append([])
            elif val == "(":
                inner = alts({")"})
                if i >= len(toks) or toks[i] != ("op", ")"):
                    raise ValueError("unbalanced parenthesis")
                i += 1
                out[-1].append(("grp", inner))
            else:
                raise ValueError(f"unexpected {val!r}")
        return out

    while i < len(toks):
        if toks[i][0] != "name" or i + 1 >= len(toks) or toks[i + 1][0] != "def":
            raise ValueError("expected 'name ::= ...'")
        name = toks[i][1]
        i += 2
        rules[name] = alts(set())
    if "root" not in rules:
        raise ValueError("grammar has no 'root' rule")
    return rules


def expand(rules: dict[str, list[list[Any]]], limit: int = 4096) -> list[str]:
    def expand_alts(alternatives: list[list[Any]], depth: int) -> list[str]:
        if depth > 32:
            raise ValueError("grammar recursion is not supported by the stub")
        out: list[str] = []
        for seq in alternatives:
            partial = [""]
            for kind, val in seq:
                if kind == "lit":
                    parts = [val]
                elif kind == "ref":
                    if val not in rules:
                        raise ValueError(f"undefined rule {val!r}")
                    parts = expand_alts(rules[val], depth + 1)
                else:
                    parts = expand_alts(val, depth + 1)
                partial = [p + q for p in partial for q in parts]
                if len(partial) > limit:
                    raise ValueError("grammar language too large for the stub")
            out.extend(partial)
        return out

    return expand_alts(rules["root"], 0)
