"""A router's state across a fleet: who holds which prefix blocks, how loaded each is.

:class:`PrefixDirectory` indexes every replica's summary by chain hash, so matching a prompt
walks the prompt's chain once and touches only replicas that hold its blocks, whatever the
fleet's size. :class:`Router` adds loads, capacities and sessions, and ranks replicas with
the cost model of :mod:`.policy`: the replicas that hold part of the prompt are scored, and
of those that hold none only the least loaded needs to be (they all prefill everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from .policy import CostModel, ReplicaView, Score, rank_replicas

__all__ = ["PrefixDirectory", "Router"]


class PrefixDirectory:
    """Chain hash -> {replica id: tier rank} over every replica's reported summary."""

    def __init__(self) -> None:
        self._index: dict[int, dict[str, int]] = {}
        self._held: dict[str, dict[int, int]] = {}

    def update(self, replica: str, held: Mapping[int, int]) -> None:
        """Replace what ``replica`` holds (its latest summary)."""
        old = self._held.get(replica, {})
        for h in old.keys() - held.keys():
            holders = self._index.get(h)
            if holders is not None:
                holders.pop(replica, None)
                if not holders:
                    del self._index[h]
        for h, rank in held.items():
            self._index.setdefault(h, {})[replica] = rank
        self._held[replica] = dict(held)

    def add(self, replica: str, chain: Sequence[int], rank: int = 0) -> None:
        """``replica`` holds these blocks too (until its next summary says otherwise)."""
        held = self._held.setdefault(replica, {})
        for h in chain:
            if held.get(h, rank + 1) > rank:
                held[h] = rank
                self._index.setdefault(h, {})[replica] = rank

    def remove(self, replica: str) -> None:
        self.update(replica, {})
        del self._held[replica]

    def held(self, replica: str) -> Mapping[int, int]:
        return self._held.get(replica, {})

    def matches(self, chain: Sequence[int]) -> dict[str, tuple[int, int]]:
        """For each replica holding the prompt's first block: how many leading blocks it
        holds, and the worst tier rank among them."""
        found: dict[str, tuple[int, int]] = {}
        for i, h in enumerate(chain):
            holders = self._index.get(h)
            if not holders:
                break
            for replica, rank in holders.items():
                prev = found.get(replica)
                if i == 0 or (prev is not None and prev[0] == i):
                    found[replica] = (i + 1, max(rank, prev[1] if prev else 0))
        return found


@attrs.define
class _Replica:
    load: int = 0
    capacity: int = 1
    sessions: frozenset[str] = frozenset()


class Router:
    """Replicas ranked for a prompt (best first) from reported prefixes and loads."""

    def __init__(self, cost: CostModel, block: int) -> None:
        self.cost = cost
        self.block = block
        self.directory = PrefixDirectory()
        self._replicas: dict[str, _Replica] = {}

    def update(
        self,
        replica: str,
        *,
        held: Mapping[int, int] | None = None,
        load: int | None = None,
        capacity: int | None = None,
        sessions: frozenset[str] | None = None,
    ) -> None:
        state = self._replicas.setdefault(replica, _Replica())
        if held is not None:
            self.directory.update(replica, held)
        if load is not None:
            state.load = load
        if capacity is not None:
            state.capacity = capacity
        if sessions is not None:
            state.sessions = sessions

    def remove(self, replica: str) -> None:
        self._replicas.pop(replica, None)
        if replica in self.directory._held:
            self.directory.remove(replica)

    def sent(self, replica: str, chain: Sequence[int]) -> None:
        """The router sent a prompt with this chain to ``replica``: count it as one more
        request there, and as holding the prompt's blocks, until the replica's next report
        (a conversation's next turn often arrives before that)."""
        self._state(replica).load += 1
        self.directory.add(replica, chain)

    def load(self, replica: str) -> int:
        """The requests counted on ``replica`` now (reported or estimated, plus sent)."""
        return self._state(replica).load

    @property
    def replicas(self) -> list[str]:
        return list(self._replicas)

    def rank(
        self,
        chain: Sequence[int],
        n_prompt: int,
        *,
        session: str | None = None,
        among: Sequence[str] | None = None,
    ) -> list[Score]:
        """The best candidates (``among``, default every replica), best first: every
        replica that holds part of the prompt or owns its session, and the least loaded of
        the rest (who would all prefill the whole prompt), scored and ranked. The cost
        grows with the replicas holding the prompt's blocks, plus one pass over loads to
        find the least loaded; a caller that wants everyone ranked uses :meth:`fallback`."""
        pool = self._replicas if among is None else {r: self._state(r) for r in among}
        if not pool:
            return []
        matched = {r: m for r, m in self.directory.matches(chain).items() if r in pool}
        scored = set(matched)
        if session is not None:
            scored |= {r for r, st in pool.items() if session in st.sessions}
        idle = min((r for r in pool if r not in scored), key=lambda r: pool[r].load, default=None)
        if idle is not None:
            scored.add(idle)
        views = []
        for r in scored:
            st = pool[r]
            blocks, rank = matched.get(r, (0, 0))
            views.append(
                ReplicaView(
                    id=r,
                    load=st.load,
                    capacity=st.capacity,
                    sessions=st.sessions,
                    blocks=blocks,
                    rank=rank,
                )
            )
        return rank_replicas(views, n_prompt, self.block, self.cost, session)

    def fallback(self, among: Sequence[str] | None = None) -> list[str]:
        """Every candidate, least loaded first: where to go when the ranked ones are full."""
        names = list(self._replicas) if among is None else list(among)
        return sorted(names, key=lambda r: self._state(r).load)

    def _state(self, replica: str) -> _Replica:
        state = self._replicas.get(replica)
        if state is None:
            state = self._replicas[replica] = _Replica()
        return state
