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
        self._held: dict[str, Mapping[int, int]] = {}

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
        self._held[replica] = held

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
        """Candidates (``among``, default every replica), best first. Scores every replica
        that holds part of the prompt, owns its session, or is the least loaded of the
        rest; the others follow by load."""
        names = list(among) if among is not None else list(self._replicas)
        if not names:
            return []
        matched = self.directory.matches(chain)
        scored = {r for r in names if r in matched}
        if session is not None:
            scored |= {r for r in names if session in self._state(r).sessions}
        rest = [r for r in names if r not in scored]
        if rest:
            scored.add(min(rest, key=lambda r: self._state(r).load))
        views = []
        for r in scored:
            st = self._state(r)
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
        ranked = rank_replicas(views, n_prompt, self.block, self.cost, session)
        tail = sorted((r for r in rest if r not in scored), key=lambda r: self._state(r).load)
        return [*ranked, *(Score(self._view(r), 0, float("inf")) for r in tail)]

    def _state(self, replica: str) -> _Replica:
        return self._replicas.get(replica) or _Replica()

    def _view(self, replica: str) -> ReplicaView:
        s = self._state(replica)
        return ReplicaView(id=replica, load=s.load, capacity=s.capacity, sessions=s.sessions)
