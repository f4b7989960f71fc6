"""The speculative primitives for callers who bring their own drafter: ``Engine.draft_tokens``
(a draft from the model's drafter) and ``Engine.verify`` (how much of a draft the model
accepts, and its next token), as in the reference's 0.1.2.

``verify`` runs as a greedy request whose prompt is the context and whose only drafter is
the caller's draft (:class:`FixedDraft`): the context is restored from the cache like any
prompt (or prefilled), the draft is checked in one forward pass, and the request is
cancelled once the answer is known. The drafter learns the answer itself: it is called with
every token the model produced, so the first one that leaves the draft (or the one after the
whole draft) is the model's next token, read from the logits the verify pass computed.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..events import Done, Verification
from ..stream import InferStream

__all__ = ["FixedDraft", "read_verification"]


class FixedDraft:
    """Proposes the rest of one given draft while the reply follows it; records the answer
    (``result``, written on the model's thread) once the reply leaves it."""

    def __init__(self, prompt_len: int, draft: Sequence[int]) -> None:
        self.prompt_len = prompt_len
        self.tokens = tuple(draft)
        self.result: Verification | None = None

    def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
        done = (*context[self.prompt_len :], last)
        k = _common(done, self.tokens)
        if k < len(done):  # the model's own token at k is not the draft's (or past it)
            self.result = Verification(accepted=k, next_token=done[k])
            return []
        return list(self.tokens[len(done) : len(done) + n])


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def read_verification(stream: InferStream, fixed: FixedDraft) -> Verification:
    """Read the verify request until the answer is known, then leave it (which cancels the
    request between two steps)."""
    async with stream:
        async for ev in stream:
            if fixed.result is not None:
                return fixed.result
            if isinstance(ev, Done):
                # It ended before the drafter saw the answer: on an end-of-generation token
                # (in the context, never drafted after), at max_tokens, or a full context.
                tail = ev.context[fixed.prompt_len :]
                k = _common(tail, fixed.tokens)
                if k < len(tail):
                    return Verification(
                        accepted=k, next_token=tail[k], eog=ev.finish_reason == "stop"
                    )
                return Verification(accepted=k, next_token=None)
    raise RuntimeError("the verify request ended without Done")  # pragma: no cover
