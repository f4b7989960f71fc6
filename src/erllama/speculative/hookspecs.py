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
from typing import Any, Protocol

import pluggy

from ..backends.types import LoadedModel
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
    """Hook specifications for a drafter plugin. ``drafter_new`` is required; a drafter
    that holds something per model (a draft model's weights and context) implements
    ``drafter_load`` and ``drafter_free`` too."""

    @hookspec(firstresult=True)
    def drafter_new(self, config: SpeculativeConfig, state: Any) -> Drafter:  # type: ignore[empty-body]
        """A drafter for one request of a model configured with ``config`` (its
        ``options`` carry the plugin's own settings); ``state`` is what ``drafter_load``
        returned for the model (None without it; an implementation may leave the argument
        out). Called on the event loop at the request's intake: keep it cheap. Raise
        ValueError for settings it cannot take."""

    @hookspec(firstresult=True)
    def drafter_load(self, config: SpeculativeConfig, model: LoadedModel) -> Any:
        """Once per model, on the model's thread right after the model loaded: set up what
        every request's drafter shares (``model`` is what the backend's ``load`` returned).
        Raise ValueError when it cannot serve this model (a draft model whose vocabulary
        differs, say): the model's load fails with a ConfigError naming it."""

    @hookspec(firstresult=True)
    def drafter_free(self, state: Any) -> None:
        """Once, on the model's thread before the model is freed: release ``state``."""
