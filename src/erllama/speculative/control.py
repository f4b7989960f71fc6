"""One request's speculative decoding: its drafter, the draft length, its counts.

The length is chosen for speed, not for acceptance alone. A draft of k tokens costs a pass
over k + 1 tokens, ``1 + slope * k`` plain passes (``slope``: :class:`~.cost.PassCost`,
learnt from the model's own steps), and brings the sampled token plus the accepted ones.
With ``p`` the chance that a drafted token is accepted given the ones before it were
(estimated from this request's verifies, recent ones weighing more), a draft of k tokens is
expected to bring ``1 + p + p^2 + ... + p^k`` tokens. Each step drafts the k (up to the
limit) that gives the most tokens per plain pass, and none when no k beats plain decoding:
then drafting pauses for 1, 2, 4 ... up to 64 steps before it tries again with one token,
so a request with nothing to draft is not slower. A draft the drafter could not make (no
match) changes nothing: it cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from .cost import DEFAULT_SLOPE, PassCost
from .hookspecs import Drafter

__all__ = ["DraftControl"]

#: Longest pause (in steps) while no draft length pays.
MAX_PAUSE = 64
#: How much the estimate of ``p`` keeps of its past at each verify (recent text counts more:
#: a reply copies a passage, then writes freely).
DECAY = 0.9
#: A draft must promise this much more than plain decoding (noise in ``p`` and the slope).
MARGIN = 1.05


@attrs.define(eq=False)
class DraftControl:
    drafter: Drafter
    #: Most tokens one draft may have.
    limit: int
    #: The request's tokens so far (its sequence's context), read at each draft; bound
    #: once the request exists.
    context: Callable[[], Sequence[int]] = tuple
    #: The model's pass cost (shared by its requests); None: the CPU default, unlearnt.
    cost: PassCost | None = None
    #: How many leading tokens of a draft the backend would choose in one mode (greedy
    #: or drawn: ``steady(greedy, draft)``), for a request that draws and whose tool-call
    #: syntax is chosen greedily; bound once the request exists. None: every token.
    steady: Callable[[bool, Sequence[int]], int] | None = None
    #: Tokens drafted and accepted over the request.
    drafted: int = 0
    accepted: int = 0
    #: Accepted draft tokens and trials (accepted, plus the rejected one of each verify that
    #: rejected one), decayed: p is their ratio (a prior of one each way).
    _hits: float = 1.0
    _trials: float = 2.0
    _pause: int = 0
    _next_pause: int = 1
    _probing: bool = False

    @property
    def p(self) -> float:
        return self._hits / self._trials

    def size(self) -> int:
        """How many tokens to draft this step (0: none); one call per step."""
        if self._pause > 0:
            self._pause -= 1
            if self._pause == 0:
                self._probing = True
            return 0
        if self._probing:
            return 1
        k, gain = best_length(self.p, self._slope(), self.limit)
        if gain < MARGIN:
            self._pause = self._next_pause
            self._next_pause = min(MAX_PAUSE, self._next_pause * 2)
            return 0
        return k

    def _slope(self) -> float:
        return self.cost.slope if self.cost is not None else DEFAULT_SLOPE

    def propose(self, n: int, greedy: bool) -> Callable[[int], Sequence[int]]:
        """What the backend calls with the sampled token: a draft of at most ``n``, to be
        verified in the mode ``greedy`` (the step's ``Decode.greedy``)."""
        drafter, context, steady = self.drafter, self.context, self.steady

        def draft(last: int) -> Sequence[int]:
            # Never more than asked: the step's batch has room for n.
            tokens = list(drafter.draft(context(), last, n))[:n]
            if steady is not None and tokens:
                # The backend checks every drafted token in one mode: the draft stops
                # where plain decoding would switch (a tool call's syntax starts or ends).
                del tokens[steady(greedy, tokens) :]
            return tokens

        return draft

    def update(self, drafted: int, accepted: int) -> None:
        """One verified draft: ``drafted`` proposed, ``accepted`` kept."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        rejected = 1 if accepted < drafted else 0
        self._hits = self._hits * DECAY + accepted
        self._trials = self._trials * DECAY + accepted + rejected
        if self._probing:
            self._probing = False
            if accepted:
                self._next_pause = 1


def best_length(p: float, slope: float, limit: int) -> tuple[int, float]:
    """The draft length (1 to ``limit``) that brings the most tokens per plain pass, and
    that number: a draft of k brings ``1 + p + ... + p^k`` tokens for ``1 + slope * k``."""
    best, best_gain = 1, 0.0
    brought, term = 1.0, 1.0
    for k in range(1, limit + 1):
        term *= p
        brought += term
        gain = brought / (1.0 + slope * k)
        if gain > best_gain:
            best, best_gain = k, gain
        if term < 1e-4:
            break
    return best, best_gain
