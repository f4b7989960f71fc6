"""A multi-tenant chat workload: many conversations over a few shared system prompts, each
turn resending the whole history. Shared by the Ray scale-out scenario and the router
simulation, so both measure the same traffic.

Token ids are synthetic (deterministic per seed): a router only ever sees token ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs

__all__ = ["Conversation", "Turn", "Workload"]


@attrs.frozen
class Turn:
    conversation: int
    index: int
    #: The prompt: system prompt + every earlier (question, reply) + this question.
    prompt: tuple[int, ...]
    #: Tokens the model will reply with (its length is what a replica decodes).
    reply: tuple[int, ...]
    #: The system prompt this conversation shares with others (for reports).
    system: int


@attrs.define
class Conversation:
    id: int
    system: int
    turns: list[Turn]


@attrs.frozen
class Workload:
    """``conversations`` conversations of ``turns`` turns over ``systems`` system prompts."""

    conversations: int = 24
    turns: int = 6
    systems: int = 4
    system_tokens: tuple[int, int] = (300, 700)
    question_tokens: tuple[int, int] = (15, 60)
    reply_tokens: tuple[int, int] = (20, 60)
    vocab: int = 40_000
    seed: int = 0

    def build(self) -> list[Conversation]:
        rng = random.Random(self.seed)

        def chunk(bounds: tuple[int, int]) -> list[int]:
            return [rng.randrange(300, self.vocab) for _ in range(rng.randint(*bounds))]

        systems = [[1, *chunk(self.system_tokens)] for _ in range(self.systems)]
        out = []
        for c in range(self.conversations):
            s = rng.randrange(self.systems)
            history = list(systems[s])
            turns = []
            for t in range(self.turns):
                history += chunk(self.question_tokens)
                reply = tuple(chunk(self.reply_tokens))
                turns.append(Turn(c, t, tuple(history), reply, s))
                history += reply
            out.append(Conversation(c, s, turns))
        return out

    def interleaved(self, seed: int = 1) -> Iterator[Turn]:
        """Every turn once, conversations interleaved at random, each conversation's turns
        in order (a closed-loop client runs them one after another)."""
        rng = random.Random(seed)
        pending = [list(c.turns) for c in self.build()]
        while any(pending):
            live = [p for p in pending if p]
            yield rng.choice(live).pop(0)
