"""Speculative decoding: drafters and the per-request draft control (docs/speculative.md).

A drafter proposes the tokens likely to follow a sequence; the backend verifies a draft in
one forward pass (``Decode.draft``) and keeps the longest prefix the model would have chosen
itself. Drafters are plugins of the entry-point group ``erllama.drafters``
(:mod:`.hookspecs`); the built-in ``ngram`` drafter (:mod:`.ngram`) registers the same way.
"""

from .control import DraftControl as DraftControl
from .hookspecs import Drafter as Drafter
from .hookspecs import hookimpl as hookimpl
from .ngram import NGramDrafter as NGramDrafter
from .registry import DrafterRegistry as DrafterRegistry
from .registry import make_drafter_registry as make_drafter_registry

__all__ = [
    "DraftControl",
    "Drafter",
    "DrafterRegistry",
    "NGramDrafter",
    "hookimpl",
    "make_drafter_registry",
]
