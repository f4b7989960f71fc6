"""Which replica should serve a prompt: the one where it costs least, counted in seconds.

For each replica the cost of a request is what it would spend before its first token:

* prefill of the tokens the replica does not hold (``prompt - matched`` at the measured
  prefill rate), plus the restore of the tokens it does hold (free from live KV or RAM, a
  per-token cost from a ``/dev/shm`` or disk file);
* waiting for the requests already queued or running there (each counted at the typical
  request's service time, learned from completions).

The cheapest replica that is not full wins; when every replica with the prefix is full the
least loaded one is chosen, so a hot prefix never piles all traffic on one replica. A
request of a session goes to the replica holding that session while it has room.

Everything here is plain computation on what replicas reported (:mod:`.prefixes`): it runs
inside Ray Serve's router, and in ``bench/`` simulations of thousands of replicas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from .prefixes import matched_blocks

__all__ = ["CostModel", "ReplicaView", "Score", "rank_replicas"]


@attrs.frozen
class CostModel:
    """Seconds per token and per request, measured or configured."""

    #: Prompt tokens prefilled per second.
    prefill_tok_per_s: float = 200.0
    #: Seconds per token to restore from each tier rank (0: live / RAM; 1: /dev/shm; 2: disk).
    restore_s_per_token: tuple[float, float, float] = (0.0, 1e-6, 2e-6)
    #: Typical service time of one queued request, in seconds.
    request_s: float = 1.0

    def prefill_s(self, n_tokens: int) -> float:
        return n_tokens / self.prefill_tok_per_s

    def restore_s(self, n_tokens: int, rank: int) -> float:
        return n_tokens * self.restore_s_per_token[min(rank, 2)]


@attrs.frozen
class ReplicaView:
    """What a router knows of one replica, for one prompt."""

    id: str
    #: Requests queued or running there (the router's estimate).
    load: int
    #: Requests it takes at once before it is full.
    capacity: int
    sessions: frozenset[str] = frozenset()
    #: How many of the prompt's leading blocks it holds, and the worst tier rank among them.
    blocks: int = 0
    rank: int = 0

    @classmethod
    def of(
        cls,
        id: str,
        held: Mapping[int, int],
        chain: Sequence[int],
        *,
        load: int,
        capacity: int,
        sessions: frozenset[str] = frozenset(),
    ) -> ReplicaView:
        """A view from a replica's whole summary (``PrefixSummary.from_wire``)."""
        blocks, rank = matched_blocks(chain, held)
        return cls(id=id, load=load, capacity=capacity, sessions=sessions, blocks=blocks, rank=rank)


@attrs.frozen
class Score:
    replica: ReplicaView
    matched_tokens: int
    seconds: float

    @property
    def full(self) -> bool:
        return self.replica.load >= self.replica.capacity


def score(replica: ReplicaView, n_prompt: int, block: int, cost: CostModel) -> Score:
    matched = min(replica.blocks * block, max(0, n_prompt - 1))
    seconds = (
        cost.prefill_s(n_prompt - matched)
        + cost.restore_s(matched, replica.rank)
        + replica.load * cost.request_s
    )
    return Score(replica, matched, seconds)


def rank_replicas(
    replicas: Sequence[ReplicaView],
    n_prompt: int,
    block: int,
    cost: CostModel,
    session: str | None = None,
) -> list[Score]:
    """Replicas best first (see the module docstring)."""
    if not replicas:
        return []
    scores = [score(r, n_prompt, block, cost) for r in replicas]
    if session is not None:
        owner = next((s for s in scores if session in s.replica.sessions), None)
        if owner is not None and not owner.full:
            return [owner, *sorted((s for s in scores if s is not owner), key=_order)]
    room = sorted((s for s in scores if not s.full), key=_order)
    if room:
        full = sorted((s for s in scores if s.full), key=lambda s: s.replica.load)
        return [*room, *full]
    # Everyone is full: the least loaded first, prefix as the tie-break.
    return sorted(scores, key=lambda s: (s.replica.load, s.seconds))


def _order(s: Score) -> tuple[float, int, str]:
    return (s.seconds, s.replica.load, s.replica.id)
