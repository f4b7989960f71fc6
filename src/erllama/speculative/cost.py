"""What one more token costs a forward pass, measured as the model runs.

Speculative decoding pays for a draft of k tokens with a pass over k + 1 tokens. Whether
that is cheap depends on the machine and the model: on a 2-core CPU with SmolLM2-135M a
pass is compute-bound and each extra token adds about 0.3 of a one-token pass
(research/speculative); a larger model or a GPU reads weights rather than computes, and an
extra token adds a few percent. :class:`PassCost` learns it from the model's own decode
steps (those with no prefill chunk): the time of steps without drafts, per number of rows,
and of steps with drafts, as the share of a plain step each extra token adds. Only the
model's thread touches it.
"""

from __future__ import annotations

__all__ = ["PassCost"]

#: The share of a one-token pass one extra token adds, until the model has measured it (the
#: CPU figure: drafting then starts cautious and gets bolder as it learns otherwise).
DEFAULT_SLOPE = 0.3
#: Weight of a new observation in the moving averages.
ALPHA = 0.1
#: Bounds of the learnt slope (a noisy step must not make drafting free or impossible).
MIN_SLOPE, MAX_SLOPE = 0.01, 2.0


class PassCost:
    def __init__(self, fixed: float | None = None) -> None:
        #: Rows in the step -> moving average of a plain step's seconds.
        self._plain: dict[int, float] = {}
        #: ``SpeculativeConfig.token_cost``: the slope is given, not learnt.
        self._fixed = fixed is not None
        self.slope = DEFAULT_SLOPE if fixed is None else fixed
        self.measured = self._fixed

    def observe(self, rows: int, extra: int, seconds: float) -> None:
        """A decode step of ``rows`` sequences whose drafts added ``extra`` tokens."""
        if rows <= 0 or seconds <= 0 or self._fixed:
            return
        if extra == 0:
            base = self._plain.get(rows)
            self._plain[rows] = seconds if base is None else base + ALPHA * (seconds - base)
            return
        base = self._plain.get(rows)
        if base is None:
            return  # nothing to compare with yet
        share = (seconds / base - 1.0) / extra
        share = min(MAX_SLOPE, max(MIN_SLOPE, share))
        if not self.measured:
            self.slope, self.measured = share, True
        else:
            self.slope += ALPHA * (share - self.slope)
