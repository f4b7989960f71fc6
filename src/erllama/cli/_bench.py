"""``erllama bench``: hands its arguments to the benchmark harness in the repository's bench/."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bench"]


def _find_bench() -> Path | None:
    """The repository's bench/ folder: beside the source tree (editable installs), or in
    the current directory or one of its parents."""
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "bench"] if len(here.parents) > 3 else []
    cwd = Path.cwd()
    candidates += [d / "bench" for d in (cwd, *cwd.parents)]
    for folder in candidates:
        if (folder / "harness.py").is_file():
            return folder
    return None


def bench(argv: Sequence[str]) -> int:
    folder = _find_bench()
    if folder is None:
        print(
            "erllama bench: no bench/ folder found; it ships with the source repository, "
            "not the wheel: run this from a checkout (pip install -e '.[llama,bench]')",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(folder))
    harness = importlib.import_module("harness")
    result: int = harness.main(list(argv))
    return result
