"""The routing decision, without Ray: which replicas a request should try, best first.

:class:`Placement` keeps one :class:`erllama.cluster.Router` per model, fed from each
replica's routing stats (the prefixes it holds per model as chain hashes, its sessions,
its load) and from what the router itself sent since. ``router.py`` wraps it in Ray Serve's
``RequestRouter``; tests drive it directly.

A replica's report (``Replica.record_routing_stats``)::

    {"load": 3,                                   # requests queued or running
     "models": {"smol": {"block": 64,
                         "tiers": {0: b"<u64 hashes>", 1: ...},   # PrefixSummary.to_wire()
                         "sessions": ["s1", ...]}}}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ..cluster import BLOCK, CostModel, PrefixSummary, Router
from .wire import GenerateRequest

__all__ = ["Placement"]

#: Sessions the router remembers sending somewhere before the replica reports them.
SESSION_MEMORY = 65_536
#: Changed reports a replica sends before what the router sent it is forgotten. The first
#: may have been taken before the request arrived (a replica reports every period, and
#: Serve forwards a report only when it changed); by the second the replica has seen it.
CREDIT_REPORTS = 2
#: Prompts per replica the router keeps crediting (the most recent).
CREDIT_LIMIT = 256


class Placement:
    """Ranks replicas for requests from their reports; event-loop (or one thread) only."""

    def __init__(self, cost: CostModel | None = None, block: int = BLOCK) -> None:
        self.cost = cost or CostModel()
        self.block = block
        self._routers: dict[str, Router] = {}
        self._reports: dict[str, Mapping[str, Any]] = {}
        self._capacity: dict[str, int] = {}
        self._load: dict[str, int] = {}
        #: Per model, per replica: the sessions it last reported.
        self._sessions: dict[str, dict[str, frozenset[str]]] = {}
        #: (model, session) -> the replica the router last sent it to.
        self._sent_sessions: OrderedDict[tuple[str, str], str] = OrderedDict()
        #: Per replica: (model, prompt chain, reports left) of what was sent there.
        self._credits: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}

    # ---- what replicas report -------------------------------------------------------------

    def report(self, replica: str, stats: Mapping[str, Any] | None, capacity: int) -> None:
        """A replica's latest routing stats. Applied only when they changed: Ray hands every
        replica's stats over whenever any one of them changes. What the router sent the
        replica stays credited for :data:`CREDIT_REPORTS` changed reports."""
        self._capacity[replica] = capacity
        for router in self._routers.values():
            router.update(replica, capacity=capacity)
        if stats is None or self._reports.get(replica) == stats:
            return
        self._reports[replica] = stats
        load = stats.get("load")
        if isinstance(load, int):
            self._load[replica] = load
        models = stats.get("models")
        models = models if isinstance(models, Mapping) else {}
        for model in set(self._routers) | set(models):
            entry = models.get(model)
            held = PrefixSummary.from_wire(entry) if isinstance(entry, Mapping) else {}
            sessions = (
                frozenset(entry.get("sessions", ())) if isinstance(entry, Mapping) else frozenset()
            )
            self._sessions.setdefault(model, {})[replica] = sessions
            self._router(model).update(
                replica,
                held=held,
                load=self._load.get(replica, 0),
                capacity=capacity,
                sessions=sessions,
            )
        credits = []
        for model, chain, left in self._credits.get(replica, ()):
            if left > 1:
                self._router(model).directory.add(replica, chain)
                credits.append((model, chain, left - 1))
        self._credits[replica] = credits

    def keep_only(self, replicas: Sequence[str]) -> None:
        """Forget replicas that are gone."""
        alive = set(replicas)
        for gone in set(self._capacity) - alive:
            self._capacity.pop(gone, None)
            self._credits.pop(gone, None)
            self._reports.pop(gone, None)
            self._load.pop(gone, None)
            for router in self._routers.values():
                router.remove(gone)
            for by_replica in self._sessions.values():
                by_replica.pop(gone, None)

    # ---- placing a request ----------------------------------------------------------------

    def order(
        self,
        request: GenerateRequest,
        candidates: Sequence[str],
        loads: Mapping[str, int | None],
    ) -> list[list[str]]:
        """Groups of replicas to try, best first: each ranked replica on its own (replicas
        holding part of the prompt or its session, and the least loaded other one, by
        cost), then everyone else together (Serve takes the least loaded of a group).
        Fills ``request.holders``. ``loads`` are Serve's queue-length estimates (None:
        unknown, the report plus what was sent since stands)."""
        router = self._router(request.model)
        for replica in candidates:
            load = loads.get(replica)
            router.update(replica, capacity=self._capacity.get(replica, 1), load=load)
        session = request.session_id
        if session is not None:
            owner = self._session_owner(request.model, session)
            if owner is not None and owner in candidates:
                held = self._sessions.get(request.model, {}).get(owner, frozenset())
                router.update(owner, sessions=held | {session})
        self.annotate(request, candidates)
        n_prompt = len(request.tokens)
        ranked = [
            s.replica.id
            for s in router.rank(request.chain, n_prompt, session=session, among=candidates)
        ]
        rest = [r for r in router.fallback(candidates) if r not in ranked]
        groups = [[r] for r in ranked]
        if rest:
            groups.append(rest)
        return groups

    def annotate(self, request: GenerateRequest, candidates: Sequence[str]) -> None:
        """Fill ``request.holders``: the candidates holding a prefix of its prompt, with the
        tokens they hold (block-aligned, at most all but the last prompt token)."""
        n_prompt = len(request.tokens)
        matches = self._router(request.model).directory.matches(request.chain)
        request.holders = {
            replica: min(blocks * self.block, max(0, n_prompt - 1))
            for replica, (blocks, _) in matches.items()
            if replica in candidates
        }

    def sent(self, replica: str, request: GenerateRequest) -> None:
        """The request went to ``replica``: count it there until its next report, credit
        it with the prompt's blocks for its next :data:`CREDIT_REPORTS` reports, and
        remember its session."""
        self._router(request.model).sent(replica, request.chain)
        if request.chain:
            credits = self._credits.setdefault(replica, [])
            credits.append((request.model, request.chain, CREDIT_REPORTS))
            del credits[:-CREDIT_LIMIT]
        if request.session_id is not None:
            key = (request.model, request.session_id)
            self._sent_sessions[key] = replica
            self._sent_sessions.move_to_end(key)
            while len(self._sent_sessions) > SESSION_MEMORY:
                self._sent_sessions.popitem(last=False)

    def _session_owner(self, model: str, session: str) -> str | None:
        for replica, sessions in self._sessions.get(model, {}).items():
            if session in sessions:
                return replica
        return self._sent_sessions.get((model, session))

    def _router(self, model: str) -> Router:
        router = self._routers.get(model)
        if router is None:
            router = self._routers[model] = Router(self.cost, self.block)
            for replica, capacity in self._capacity.items():
                router.update(replica, capacity=capacity, load=self._load.get(replica, 0))
        return router
