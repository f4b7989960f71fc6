"""What a GBNF grammar will cost llama.cpp's sampler, judged before anything runs.

llama.cpp's grammar sampler runs inside one native call per token that nothing can
interrupt: a client disconnect, a cancel, SIGTERM all wait for it. Some small grammars make
that call take forever. Measured on SmolLM2-135M (49k vocabulary):

* a bounded repetition of something that can match nothing, ``("a"?){0,64}`` or
  ``(a{0,2}){0,64}`` (the pattern ``^(a{0,2}){0,64}$``), grows the sampler's parse stacks
  combinatorially: 0.9 s a token and climbing at a count of 64, a wedged model at
  ``(a{0,2}){0,256}``, ``(a{0,256}){0,2}`` or ``(a{0,512}){0,512}``; while
  ``("a"?){0,32}`` and ``(("a"?){0,4}){0,8}`` stay near 0.1 s a token;
* nested repetitions of things that cannot be empty, ``(ab{0,128}){0,128}`` or an array
  of 512 strings of 512 characters, stay near 0.1 s a token;
* ``{m,n}`` is expanded by llama.cpp into ``n`` copies of the repeated item, so the size
  of the grammar after expansion, not the text, is what its memory and setup cost.

So :func:`check_grammar` refuses, naming ``param``: text longer than
``MAX_GRAMMAR_BYTES``; more than ``MAX_EXPANDED`` elements after expansion; a repetition
of something nullable whose count, times the repetitions nested inside it, exceeds
``MAX_NULLABLE_REPEAT``; and nested repetition counts whose product exceeds
``MAX_REPEAT_PRODUCT``. Costs it cannot see (a heavily ambiguous grammar of non-empty
items, say) are bounded while running: the llama.cpp backend fails a request whose
grammar makes one sampling step take longer than its ``grammar_step_limit_s``.

Everything here is linear in the grammar's text and iterative (no recursion: converter
output nests parentheses hundreds deep).
"""

from __future__ import annotations

import re
from collections import defaultdict

from .errors import InvalidRequest

__all__ = [
    "MAX_EXPANDED",
    "MAX_GRAMMAR_BYTES",
    "MAX_NULLABLE_REPEAT",
    "MAX_REPEAT_PRODUCT",
    "check_grammar",
]

MAX_GRAMMAR_BYTES = 1 << 20
MAX_EXPANDED = 1 << 20
MAX_NULLABLE_REPEAT = 32
MAX_REPEAT_PRODUCT = 1 << 20

_TOKENS = re.compile(
    r"""
      (?P<space>[ \t\r\n]+ | \#[^\n]*)
    | (?P<define>::=)
    | (?P<name>[A-Za-z0-9_-]+)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<cls>\[(?:[^\]\\]|\\.)*\])
    | (?P<token>!?<[^>\n]*>)
    | (?P<rep>\{\s*\d*\s*(?:,\s*\d*\s*)?\})
    | (?P<op>[|()*+?.])
    """,
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")

#: One item of a sequence: (atom, min, max). The atom is a rule name (``str``) or the
#: number of characters it matches (``int``: 0 for an empty literal, 1 for a class).
Item = tuple[str | int, int, int | None]
Rule = list[list[Item]]


def _bad(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(param, reason)


def _postfix(text: str) -> tuple[int, int | None]:
    if text == "*":
        return 0, None
    if text == "+":
        return 1, None
    if text == "?":
        return 0, 1
    inner = text[1:-1].replace(" ", "")
    if "," not in inner:
        n = int(inner or 0)
        return n, n
    lo, _, hi = inner.partition(",")
    return int(lo or 0), (int(hi) if hi else None)


def _parse(text: str, param: str) -> dict[str, Rule]:
    """Rules by name; each parenthesised group becomes a rule of its own (as llama.cpp
    makes it), so no rule nests."""
    rules: dict[str, Rule] = {}
    tokens: list[tuple[str | None, str]] = []
    pos = 0
    for m in _TOKENS.finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    if pos != len(text):
        raise _bad(param, f"is not GBNF: cannot read it at character {pos}")
    groups = 0
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind != "name" or i + 1 >= len(tokens) or tokens[i + 1][0] != "define":
            raise _bad(param, f"is not GBNF: expected 'name ::=' near {value!r}")
        name = value
        i += 2
        # (rule name, alternatives) per open parenthesis; the rule's own body first.
        stack: list[tuple[str, Rule]] = [(name, [[]])]
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "name" and i + 1 < len(tokens) and tokens[i + 1][0] == "define":
                break  # the next rule
            i += 1
            seq = stack[-1][1][-1]
            if kind == "name":
                seq.append((value, 1, 1))
            elif kind == "string":
                seq.append((len(_ESCAPE.sub("x", value[1:-1])), 1, 1))
            elif kind in ("cls", "token") or value == ".":
                seq.append((1, 1, 1))
            elif kind == "rep" or value in ("*", "+", "?"):
                if not seq:
                    raise _bad(param, f"is not GBNF: {value!r} repeats nothing")
                lo, hi = _postfix(value)
                if hi is not None and hi < lo:
                    raise _bad(param, f"is not GBNF: repetition {value}")
                atom, _, _ = seq[-1]
                seq[-1] = (atom, lo, hi)
            elif value == "|":
                stack[-1][1].append([])
            elif value == "(":
                groups += 1
                stack.append((f"({groups}", [[]]))
            elif value == ")":
                if len(stack) == 1:
                    raise _bad(param, "is not GBNF: unbalanced ')'")
                group, alts = stack.pop()
                rules[group] = alts
                stack[-1][1][-1].append((group, 1, 1))
            else:
                raise _bad(param, f"is not GBNF near {value!r}")
        if len(stack) != 1:
            raise _bad(param, "is not GBNF: unbalanced '('")
        rules[name] = stack[0][1]
    if "root" not in rules:
        raise _bad(param, "has no 'root' rule")
    return rules


def _nullable(rules: dict[str, Rule]) -> set[str]:
    """Rules that can match the empty string (a worklist: linear in the grammar)."""
    waiting: dict[str, list[tuple[str, int]]] = defaultdict(list)  # rule -> (owner, seq)
    pending: dict[tuple[str, int], int] = {}
    ready: list[str] = []
    for name, alts in rules.items():
        for k, seq in enumerate(alts):
            blockers = 0
            for atom, lo, _hi in seq:
                if lo == 0 or atom == 0:
                    continue
                if isinstance(atom, str):
                    waiting[atom].append((name, k))
                blockers += 1
            pending[(name, k)] = blockers
            if blockers == 0:
                ready.append(name)
    nullable: set[str] = set()
    while ready:
        name = ready.pop()
        if name in nullable:
            continue
        nullable.add(name)
        for owner, k in waiting.get(name, ()):
            pending[(owner, k)] -= 1
            if pending[(owner, k)] == 0:
                ready.append(owner)
    return nullable


def _count(lo: int, hi: int | None) -> int:
    """How many copies of an item llama.cpp's expansion of ``{lo,hi}`` makes."""
    return max(lo, hi) if hi is not None else lo + 1


def _depths(rules: dict[str, Rule]) -> dict[str, int]:
    """For each rule, the largest product of bounded repetition counts nested inside it
    (through references; a reference back into a rule being computed counts as 1)."""
    depth: dict[str, int] = {}
    for start in rules:
        if start in depth:
            continue
        active = {start}
        stack = [start]
        while stack:
            name = stack[-1]
            deps = {item[0] for seq in rules[name] for item in seq if isinstance(item[0], str)}
            todo = [d for d in deps if d in rules and d not in depth and d not in active]
            if todo:
                active.update(todo)
                stack.extend(todo)
                continue
            stack.pop()
            active.discard(name)
            best = 1
            for seq in rules[name]:
                for atom, lo, hi in seq:
                    inner = depth.get(atom, 1) if isinstance(atom, str) else 1
                    factor = _count(lo, hi) if hi is not None and hi >= 2 else 1
                    best = max(best, factor * inner)
            depth[name] = min(best, MAX_REPEAT_PRODUCT + 1)
    return depth


def check_grammar(text: str, param: str = "grammar") -> None:
    """InvalidRequest naming ``param`` unless ``text`` is GBNF within the bounds above."""
    if len(text) > MAX_GRAMMAR_BYTES:
        raise _bad(param, f"is longer than {MAX_GRAMMAR_BYTES} characters")
    rules = _parse(text, param)
    for name, alts in rules.items():
        for seq in alts:
            for atom, _lo, _hi in seq:
                if isinstance(atom, str) and atom not in rules:
                    shown = "a group" if name.startswith("(") else repr(name)
                    raise _bad(param, f"{shown} names an undefined rule {atom!r}")
    expanded = 0
    for alts in rules.values():
        for seq in alts:
            for atom, lo, hi in seq:
                size = atom if isinstance(atom, int) and atom > 1 else 1
                expanded += size * max(_count(lo, hi), 1)
    if expanded > MAX_EXPANDED:
        raise _bad(
            param, f"expands to more than {MAX_EXPANDED} elements (repetition counts multiply)"
        )
    nullable = _nullable(rules)
    depth = _depths(rules)
    if depth.get("root", 1) > MAX_REPEAT_PRODUCT:
        raise _bad(param, f"nests repetitions whose counts multiply past {MAX_REPEAT_PRODUCT}")
    for alts in rules.values():
        for seq in alts:
            for atom, lo, hi in seq:
                if not (isinstance(atom, str) and atom in nullable):
                    continue
                count = _count(lo, hi)
                if count < 2 or hi is None:
                    continue
                inner = depth.get(atom, 1)
                cost = count * inner
                if cost > MAX_NULLABLE_REPEAT:
                    around = f", around nested repetitions of {inner}" if inner > 1 else ""
                    raise _bad(
                        param,
                        f"repeats something that can be empty {count} times{around} "
                        f"({cost} in all, at most {MAX_NULLABLE_REPEAT}): llama.cpp's "
                        "sampler cost grows combinatorially with that; make the repeated "
                        "part non-empty (a{1,n}, not a{0,n}, inside a repetition)",
                    )
