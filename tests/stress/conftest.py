"""Shared by the stress files: the suite's figures, printed once at the end of the run.

Each stress test adds what it did with :func:`record`, under a name of the form
``"<file>: <what>"`` (``"hostile cache: requests"``, ``"kill mid-save: kills"``). After the
run, :func:`pytest_terminal_summary` prints every figure in one block titled "stress
figures", so the size of a stress run is on record next to its result. A new stress file
needs nothing but ``from .conftest import record``.

:func:`cold_reference` is what every stress file compares served output with: the answer of
a fresh engine with the cache off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import erllama
from erllama.plugins import BackendRegistry

from ..helpers import cold_run, stub_config

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


async def cold_reference(
    registry: BackendRegistry,
    prompt: str | list[int],
    stub_options: Mapping[str, object] | None = None,
    **kw: Any,
) -> erllama.Completion:
    """What a fresh engine with the cache off answers: :func:`tests.helpers.cold_run`, for a
    stub loaded with ``stub_options`` too (``eog_every`` changes what the stub says)."""
    if not stub_options:
        return await cold_run(registry, prompt, **kw)
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("cold", stub_config(**stub_options))
        return await engine.complete(mid, prompt, **kw)
