"""One request's speculative decoding: its drafter, the draft length it adapts, its counts.

The length follows the acceptance, as llama-server's does: a draft accepted whole doubles
it (up to the limit), a draft accepted in part sets it just past what was accepted, and
drafts that keep failing pause drafting for a number of steps that doubles each time (up to
64), so a request whose text cannot be drafted decodes as plainly as without speculation.
A draft the drafter could not make (no match) changes nothing: it cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from .hookspecs import Drafter

__all__ = ["DraftControl"]

#: Longest pause (in steps) after drafts keep failing.
MAX_PAUSE = 64
#: Drafts in a row accepted not at all before drafting pauses.
MISSES_BEFORE_PAUSE = 2


@attrs.define(eq=False)
class DraftControl:
    drafter: Drafter
    #: Most tokens one draft may have.
    limit: int
    #: The request's tokens so far (its sequence's context), read at each draft; bound
    #: once the request exists.
    context: Callable[[], Sequence[int]] = tuple
    length: int = attrs.field(default=0)
    #: Tokens drafted and accepted over the request.
    drafted: int = 0
    accepted: int = 0
    _misses: int = 0
    _pause: int = 0
    _next_pause: int = 1

    def __attrs_post_init__(self) -> None:
        if self.length <= 0:
            self.length = self.limit

    def size(self) -> int:
        """How many tokens to draft this step (0 while paused); one call per step."""
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.length

    def propose(self, n: int) -> Callable[[int], Sequence[int]]:
        """What the backend calls with the sampled token: a draft of at most ``n``."""
        drafter, context = self.drafter, self.context

        def draft(last: int) -> Sequence[int]:
            # Never more than asked: the step's batch has room for n.
            return list(drafter.draft(context(), last, n))[:n]

        return draft

    def update(self, drafted: int, accepted: int) -> None:
        """One verified draft: ``drafted`` proposed, ``accepted`` kept."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted >= drafted:
            self.length = min(self.limit, self.length * 2)
        elif accepted > 0:
            self.length = min(self.limit, accepted + 1)
        else:
            self.length = max(1, self.length // 2)
            self._misses += 1
            if self._misses >= MISSES_BEFORE_PAUSE:
                self._pause = self._next_pause
                self._next_pause = min(MAX_PAUSE, self._next_pause * 2)
                self._misses = 0
            return
        self._misses = 0
        self._next_pause = 1
