"""Shared by the stress files: the suite's figures, printed once at the end of the run.

Each stress test adds what it did with :func:`record`, under a name of the form
``"<file>: <what>"`` (``"hostile cache: requests"``, ``"kill mid-save: kills"``). After the
run, :func:`pytest_terminal_summary` prints every figure in one block titled "stress
figures", so the size of a stress run is on record next to its result. A new stress file
needs nothing but ``from .conftest import record``.

:func:`tests.helpers.cold_run` is what every stress file compares served output with: the
answer of a fresh engine with the cache off.
"""

from __future__ import annotations

import pytest

#: Figure name -> total over the run (this process).
STRESS_FIGURES: dict[str, int] = {}


def record(name: str, n: int = 1) -> None:
    """Add ``n`` to the figure ``name``."""
    STRESS_FIGURES[name] = STRESS_FIGURES.get(name, 0) + n


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not STRESS_FIGURES:
        return
    terminalreporter.section("stress figures")
    width = max(map(len, STRESS_FIGURES))
    for name in sorted(STRESS_FIGURES):
        terminalreporter.write_line(f"{name:<{width}}  {STRESS_FIGURES[name]:>8}")
