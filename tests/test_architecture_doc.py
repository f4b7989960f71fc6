"""docs/architecture.md names real code: every module it cites exists, and every function,
class or constant it names in parentheses after a module is defined in that module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SRC = REPO / "src" / "erllama"

#: `model/gate.py` optionally followed by (`name`, `name`) .
CITE = re.compile(r"`(?P<module>[\w/]+\.py)`(?:\s*\((?P<names>[^)]*)\))?")
NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def _defined(module: Path) -> set[str]:
    """Every name defined anywhere in ``module``: functions, classes, methods, assigned
    names and attributes assigned on ``self``."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _citations() -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for match in CITE.finditer(DOC.read_text(encoding="utf-8")):
        names = NAME.findall(match["names"] or "")
        if not names:
            found.append((match["module"], None))
        for name in names:
            found.append((match["module"], name))
    return found


CITATIONS = _citations()


def test_the_document_cites_code_at_all() -> None:
    assert len(CITATIONS) > 30
    assert {m for m, _ in CITATIONS} >= {"model/gate.py", "model/scheduler.py", "model/thread.py"}


@pytest.mark.parametrize(("module", "name"), CITATIONS, ids=[f"{m}:{n}" for m, n in CITATIONS])
def test_each_cited_module_and_name_exists(module: str, name: str | None) -> None:
    path = SRC / module
    assert path.is_file(), f"docs/architecture.md cites {module}, which does not exist"
    if name is not None:
        assert name.split(".")[-1] in _defined(path), f"{module} defines no {name}"
