"""A second GGUF for the ``models`` scenario: the bundled model requantized to Q8_0.

Only SmolLM2 (Q4_1) ships with erllama and nothing downloads at run time, so "two different
GGUFs" are the bundled file and this one: the same weights in another quantization, hence
another file with its own tensors, kernels (Q8_0 against Q4_1 dot products), size and speed.
llama.cpp's own ``llama_model_quantize`` writes it (``allow_requantize``: the source is
already quantized, so the Q8_0 weights carry Q4_1's rounding; that changes nothing measured
here). It is made once, in a process of its own, and kept under ``bench/.cache/``.

    python bench/second_gguf.py     # prints its path, making it if needed
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
params.allow_requantize = True
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if rc else 0)
"""


def q8_0(source: Path) -> Path:
    """``source`` requantized to Q8_0 (made on first use, then reused)."""
    out = CACHE / f"{source.stem}.requantized-q8_0.gguf"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _QUANTIZE, str(source), str(tmp)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"requantizing {source} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)  # whole or absent: a half-written file is never reused
    finally:
        tmp.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    from erllama.bundled import INSTALL_HINT, bundled_model_path

    path = bundled_model_path()
    if path is None:
        raise SystemExit(f"the bundled model is missing: {INSTALL_HINT}")
    print(q8_0(path))
