"""Run the benchmark harness: ``python bench/run.py [--quick] [--only NAME] [--out DIR]``.

The same as ``erllama bench``; see bench/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

if __name__ == "__main__":
    raise SystemExit(harness.main(prog="python bench/run.py"))
