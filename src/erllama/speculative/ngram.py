"""The ``ngram`` drafter: the reply so far looked up in the prompt and in itself.

Edits, copies, code rewrites and JSON filled from a document repeat long runs of their
input. After each sampled token the drafter takes the last ``k`` tokens (``k`` from
``ngram_max`` down to ``ngram_min``), finds where that run last occurred earlier in the
sequence, and proposes what followed it there. Nothing matched: an empty draft, no cost.

The index is incremental: each token is indexed once, as the sequence grows (a dict per run
length, run -> the position after its latest occurrence), so a step costs O(ngram_max).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import SpeculativeConfig
from .hookspecs import hookimpl

__all__ = ["NGramDrafter", "drafter_new"]


class NGramDrafter:
    def __init__(self, ngram_min: int = 2, ngram_max: int = 4) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self._sizes = tuple(range(ngram_max, ngram_min - 1, -1))
        #: Run length -> run -> the position right after its latest indexed occurrence.
        self._index: dict[int, dict[tuple[int, ...], int]] = {k: {} for k in self._sizes}
        #: Runs ending before this position are indexed (their continuation is known).
        self._seen = 0
        self._n = 0

    def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
        if n <= 0:
            return []
        size = len(context)
        if size < self._n:  # a new sequence (the caller reused the drafter): start over
            for runs in self._index.values():
                runs.clear()
            self._seen = 0
        self._n = size
        # Index every run whose continuation lies inside ``context``: the run ending at
        # position e - 1 is followed by position e, for e up to size - 1.
        for end in range(max(self._seen, 1), size):
            for k, runs in self._index.items():
                if end >= k:
                    runs[tuple(context[end - k : end])] = end
        self._seen = max(self._seen, size)
        for k in self._sizes:
            if k > size + 1:
                continue
            run = (*context[size - k + 1 :], last) if k > 1 else (last,)
            start = self._index[k].get(run)
            if start is None:
                continue
            # What followed the earlier occurrence, up to where the sequence now ends (the
            # token after ``context`` is ``last`` itself).
            out = list(context[start : start + n])
            if len(out) < n and start + len(out) == size:
                out.append(last)
            return out[:n]
        return []


@hookimpl
def drafter_new(config: SpeculativeConfig) -> NGramDrafter:
    return NGramDrafter(ngram_min=config.ngram_min, ngram_max=config.ngram_max)
