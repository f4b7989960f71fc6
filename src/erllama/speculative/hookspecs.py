"""The ``DrafterSource`` hook specification: how the engine gets a request's drafter.

A drafter plugin (a module, an object, or a class taking no arguments) implements
:meth:`DrafterSource.drafter_new` and is registered in the entry-point group
``erllama.drafters`` under the name users give as ``SpeculativeConfig.drafter``::

    [project.entry-points."erllama.drafters"]
    mydrafter = "my_package.drafter"

Each plugin gets its own plugin manager (project name ``erllama.drafters``), so a module may
be a backend, a pressure source and a drafter at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pluggy

from ..config import SpeculativeConfig

__all__ = ["PROJECT", "Drafter", "DrafterSource", "hookimpl", "hookspec"]

PROJECT = "erllama.drafters"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Drafter(Protocol):
    """One request's drafter. Called on the model's thread, between a token's sampling and
    its forward pass, so it must be quick (the step waits for it) and must not block."""

    def draft(self, context: Sequence[int], last: int, n: int) -> Sequence[int]:
        """Up to ``n`` tokens likely to follow ``context`` and then ``last``.

        ``context`` is every token in the request's sequence (prompt, then the reply so
        far); between two calls of one request it only grows at its end, so a drafter may
        index it incrementally. ``last`` is the token just sampled (not yet in
        ``context``). Return fewer tokens, or none, when nothing is likely: an empty draft
        costs nothing."""
        ...


class DrafterSource:
    """Hook specifications for a drafter plugin."""

    @hookspec(firstresult=True)
    def drafter_new(self, config: SpeculativeConfig) -> Drafter:  # type: ignore[empty-body]
        """A drafter for one request of a model configured with ``config`` (its
        ``options`` carry the plugin's own settings). Called on the event loop at the
        request's intake: keep it cheap. Raise ValueError for settings it cannot take."""
