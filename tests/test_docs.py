"""Every Python block the documentation marks as runnable runs, so the docs cannot drift.

A block is marked by an HTML comment on the line before its fence, which GitHub does not
render (the block keeps its highlighting):

    <!-- runnable -->                 a whole program, run as __main__
    <!-- runnable with engine, mid -->  a fragment continuing the getting-started example

Each block runs in its own subprocess (tests/run_doc_block.py), from a temporary directory
so that no block depends on the repository as its working directory, with the bundled
SmolLM2 installed. Unmarked blocks are illustrative fragments.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNER = Path(__file__).with_name("run_doc_block.py")
MARK = re.compile(r"<!-- runnable(?P<engine> with engine, mid)? -->")


@attrs.frozen
class Block:
    path: Path
    #: 1-based line of the opening fence.
    line: int
    code: str
    with_engine: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i, text in enumerate(lines):
        mark = MARK.fullmatch(text.strip())
        if mark is None:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        assert fence == "```python", f"{path.name}:{i + 1}: a runnable mark must precede ```python"
        end = lines.index("```", i + 2)
        code = "\n".join(lines[i + 2 : end]) + "\n"
        found.append(Block(path, i + 2, code, with_engine=mark["engine"] is not None))
    return found


BLOCKS = [b for path in DOCS for b in _blocks(path)]


def test_the_runnable_blocks_are_where_the_docs_promise_them() -> None:
    # A mark lost in an edit would silently drop its block from the run below.
    per_file = {p.name: sum(b.path == p for b in BLOCKS) for p in DOCS}
    assert per_file["README.md"] >= 1
    assert per_file["getting-started.md"] >= 4
    assert per_file["backends.md"] >= 1
    assert per_file["caching.md"] >= 1
    assert per_file["loading.md"] >= 3
    # Every python block that is not marked looks like a fragment on purpose: no marks
    # misspelt into something MARK does not match.
    for path in DOCS:
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "runnable" in text and text.lstrip().startswith("<!--"):
                assert MARK.fullmatch(text.strip()), f"{path.name}:{n}: unknown mark {text!r}"


@pytest.mark.real_model
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_a_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    argv = [sys.executable, str(RUNNER), str(script), str(tmp_path / "scratch")]
    proc = subprocess.run(
        [*argv, *(["--with-engine"] if block.with_engine else [])],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{block.where} failed:\n{proc.stdout}\n{proc.stderr}"


def test_every_logger_erllama_uses_is_documented() -> None:
    names = set()
    for source in (REPO / "src" / "erllama").rglob("*.py"):
        names |= set(re.findall(r'getLogger\("(erllama[.\w]*)"\)', source.read_text()))
    assert names, "no loggers found: has the pattern changed?"
    loading = (REPO / "docs" / "loading.md").read_text(encoding="utf-8")
    for name in sorted(names):
        assert f"`{name}`" in loading, f"logger {name} is not in docs/loading.md"
