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

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ..cluster import BLOCK, CostModel, PrefixDirectory, PrefixSummary, ReplicaView, Router, Score
from ..cluster.policy import score
from .inflight import InFlight
from .wire import GenerateRequest

__all__ = ["FetchCost", "Placement"]

#: Sessions the router remembers sending somewhere before the replica reports them.
SESSION_MEMORY = 65_536
#: Changed reports a replica sends before what the router sent it is forgotten. The first
#: may have been taken before the request arrived (a replica reports every period, and
#: Serve forwards a report only when it changed); by the second the replica has seen it.
CREDIT_REPORTS = 2
#: Prompts per replica the router keeps crediting (the most recent).
CREDIT_LIMIT = 256
#: How long a choice Serve has not confirmed (``on_request_routed``) still counts. Serve
#: confirms a request it sent after one round trip to the replica; a choice it never sends
#: (``choose_replica`` without dispatch, a request cancelled while routing) must not stay.
PROVISIONAL_S = 1.0


@attrs.frozen
class FetchCost:
    """What the router expects fetching a row from another replica to cost
    (``transfer.py``): ``latency_s`` plus ``s_per_token`` for every token of the row."""

    s_per_token: float
    latency_s: float = 0.02
    #: A shorter gap is never fetched (the replicas' TransferPolicy.min_tokens).
    min_tokens: int = BLOCK

    def seconds(self, row_tokens: int) -> float:
        return self.latency_s + row_tokens * self.s_per_token


@attrs.define
class _Choice:
    """A request the router placed and Serve has not yet confirmed sending."""

    replica: str
    request: GenerateRequest
    at: float
    #: When the router expects the replica to hold the prompt (its queue, then its prefill).
    ready_at: float
    #: Serve has sent it and counts it in its queue-length estimate (not yet confirmed).
    counted: bool = False


@attrs.frozen
class _Credit:
    """A prompt the router sent a replica: credited with its blocks for ``left`` more
    changed reports; the replica should hold it from ``ready_at`` on."""

    model: str
    chain: tuple[int, ...]
    left: int
    ready_at: float


class Placement:
    """Ranks replicas for requests from their reports; event-loop (or one thread) only.

    The cost of a replica is ``erllama.cluster``'s: the prefill it would do, plus its queue.
    Two refinements, each on when configured:

    * ``decode_tok_per_s``: the queue is counted in seconds, not requests. The router knows
      what it sent each replica (prompt tokens the replica lacked, ``max_tokens``) and when,
      so a replica busy with one long cold prompt weighs more than one finishing a short
      reply. Requests it did not send (other routers') count ``request_s`` each.
    * ``fetch`` (replicas fetch rows from each other): a replica lacking a prefix another
      reported holding is scored as if it fetched it, when that is cheaper than
      prefilling, so a busy holder loses to an idle replica sooner: the prefix follows the
      request.
    """

    def __init__(
        self,
        cost: CostModel | None = None,
        block: int = BLOCK,
        fetch: FetchCost | None = None,
        *,
        decode_tok_per_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cost = cost or CostModel()
        self.block = block
        self.fetch = fetch
        self.decode_tok_per_s = decode_tok_per_s
        self._clock = clock
        #: The work of requests this router sent and has not seen complete.
        self._inflight = InFlight(self.cost.request_s, clock)
        self._routers: dict[str, Router] = {}
        self._reports: dict[str, Mapping[str, Any]] = {}
        self._capacity: dict[str, int] = {}
        self._load: dict[str, int] = {}
        #: When each replica's report last changed, and when Serve's queue-length estimate
        #: for it last changed (:meth:`serve_estimate_changed`): the newer of the two says
        #: how loaded it is (see :meth:`_load_now`).
        self._reported_at: dict[str, float] = {}
        self._serve_at: dict[str, float] = {}
        #: Per model, per replica: the sessions it last reported.
        self._sessions: dict[str, dict[str, frozenset[str]]] = {}
        #: (model, session) -> the replica the router last sent it to.
        self._sent_sessions: OrderedDict[tuple[str, str], str] = OrderedDict()
        #: Per replica: what was sent there (see _Credit).
        self._credits: dict[str, list[_Credit]] = {}
        #: Per model: what replicas reported, without what was sent since. Only a reported
        #: prefix can be fetched: a prompt sent a moment ago may still be prefilling.
        self._reported: dict[str, PrefixDirectory] = {}
        #: Request id -> where the router placed it, until Serve confirms the send (then
        #: it is accounted by :meth:`sent`) or :data:`PROVISIONAL_S` passes. Serve routes
        #: several requests before it confirms any (each confirmation waits on a replica),
        #: so without these a burst of requests would all see the same idle replica.
        self._chosen: OrderedDict[str, _Choice] = OrderedDict()

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
        self._reported_at[replica] = self._clock()
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
            self._reported.setdefault(model, PrefixDirectory()).update(replica, held)
            self._router(model).update(
                replica,
                held=held,
                load=self._load.get(replica, 0),
                capacity=capacity,
                sessions=sessions,
            )
        self._credits[replica] = [
            attrs.evolve(c, left=c.left - 1) for c in self._credits.get(replica, ()) if c.left > 1
        ]
        self._recredit(replica)

    def _recredit(self, replica: str) -> None:
        """Add back, over ``replica``'s reported prefixes in each router's directory, what
        the router sent it (credits) and placed there unconfirmed (choices)."""
        for credit in self._credits.get(replica, ()):
            self._router(credit.model).directory.add(replica, credit.chain)
        for choice in self._chosen.values():
            if choice.replica == replica and choice.request.chain:
                self._router(choice.request.model).directory.add(replica, choice.request.chain)

    def keep_only(self, replicas: Sequence[str]) -> None:
        """Forget replicas that are gone."""
        alive = set(replicas)
        for gone in set(self._capacity) - alive:
            for request_id in [k for k, c in self._chosen.items() if c.replica == gone]:
                del self._chosen[request_id]
            self._capacity.pop(gone, None)
            self._credits.pop(gone, None)
            self._reports.pop(gone, None)
            self._load.pop(gone, None)
            self._reported_at.pop(gone, None)
            self._serve_at.pop(gone, None)
            for router in self._routers.values():
                router.remove(gone)
            for by_replica in self._sessions.values():
                by_replica.pop(gone, None)
            for directory in self._reported.values():
                directory.update(gone, {})
            self._inflight.forget(gone)

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
        self._expire_choices()
        router = self._router(request.model)
        unconfirmed: dict[str, int] = {}
        for choice in self._chosen.values():
            if not choice.counted:
                unconfirmed[choice.replica] = unconfirmed.get(choice.replica, 0) + 1
        for replica in candidates:
            load = self._load_now(replica, loads.get(replica), unconfirmed.get(replica, 0))
            router.update(replica, capacity=self._capacity.get(replica, 1), load=load)
        session = request.session_id
        if session is not None:
            owner = self._session_owner(request.model, session)
            if owner is not None and owner in candidates:
                held = self._sessions.get(request.model, {}).get(owner, frozenset())
                router.update(owner, sessions=held | {session})
        self.annotate(request, candidates)
        n_prompt = len(request.tokens)
        scores = router.rank(request.chain, n_prompt, session=session, among=candidates)
        if scores and (self.fetch is not None or self.decode_tok_per_s is not None):
            scores = self._rescore(request, candidates, scores, router)
        ranked = [s.replica.id for s in scores]
        rest = [r for r in router.fallback(candidates) if r not in ranked]
        groups = [[r] for r in ranked]
        if rest:
            groups.append(rest)
        return groups

    def serve_estimate_changed(self, replica: str) -> None:
        """Serve's queue-length estimate for ``replica`` changed now (a send, a reply from
        the replica, a completion)."""
        self._serve_at[replica] = self._clock()

    def _load_now(self, replica: str, serve: int | None, unconfirmed: int) -> int:
        """The requests to count on ``replica`` now.

        Serve's estimate (``serve``, plus the choices it has not counted yet) when it is
        newer than the replica's last changed report; otherwise the report, or the requests
        this router sent there and has not seen complete if more. Serve's estimate can be
        wrong high for its whole life (10 s): a replica answering a send or a probe counts
        a request that has just ended, and nothing corrects it until a later exchange with
        that replica, so an idle holder of a conversation looked busy and its next turn
        went elsewhere. Once the estimate has expired (None) the report stands: keeping
        the last estimate instead kept an idle replica "busy" until its report changed,
        which for an idle replica may be never (a CI run waited 60 s for it)."""
        own = max(self._load.get(replica, 0), self._inflight.count(replica))
        if serve is None:
            return own
        serve_at = self._serve_at.get(replica)
        if serve_at is not None and serve_at < self._reported_at.get(replica, serve_at):
            return own
        return serve + unconfirmed  # Serve counts requests once it sends them

    def _rescore(
        self,
        request: GenerateRequest,
        candidates: Sequence[str],
        scores: list[Score],
        router: Router,
    ) -> list[Score]:
        """Every candidate scored with the refinements (see the class docstring), in
        ``rank_replicas``'s order: the session owner first, then by seconds, full last."""
        n_prompt = len(request.tokens)
        scored = {s.replica.id for s in scores}
        for replica in candidates:  # the rest lack the prompt: only their queues differ
            if replica not in scored:  # its load: as order() just set it
                view = ReplicaView(
                    id=replica,
                    load=router.load(replica),
                    capacity=self._capacity.get(replica, 1),
                )
                scores.append(score(view, n_prompt, self.block, self.cost))
        now = self._clock()
        best = max(request.holders.values(), default=0)
        fetch = self.fetch

        def seconds(s: Score) -> float:
            total = s.seconds
            if self.decode_tok_per_s is not None:
                queue = self.queue_s(s.replica.id, s.replica.load, now)
                total += queue - s.replica.load * self.cost.request_s
            gap = best - s.matched_tokens
            if fetch is not None and gap >= fetch.min_tokens:
                total = min(total, total - self.cost.prefill_s(gap) + fetch.seconds(best))
            if fetch is not None:
                total = min(total, self._after_filling(request, s, total, now))
            return total

        first = scores[0]
        session = request.session_id
        owner = session is not None and session in first.replica.sessions and not first.full
        head = [first] if owner else []
        room = [s for s in scores[len(head) :] if not s.full]
        full = sorted((s for s in scores[len(head) :] if s.full), key=lambda s: s.replica.load)
        room.sort(key=lambda s: (seconds(s), s.replica.load, s.replica.id))
        return [*head, *room, *full]

    def _after_filling(self, request: GenerateRequest, s: Score, total: float, now: float) -> float:
        """``total`` (the seconds of ``s``) if the replica fetched a prefix another one is
        still prefilling (``request.filling``): it waits for the row and fetches it while
        its own queue drains, then prefills the rest."""
        fetch = self.fetch
        assert fetch is not None
        best = total
        queue = (
            self.queue_s(s.replica.id, s.replica.load, now)
            if self.decode_tok_per_s is not None
            else s.replica.load * self.cost.request_s
        )
        for holder, (tokens, ready_in) in request.filling.items():
            gap = tokens - s.matched_tokens
            if holder == s.replica.id or gap < fetch.min_tokens:
                continue
            wait = ready_in + fetch.seconds(tokens)
            best = min(best, total - queue - self.cost.prefill_s(gap) + max(queue, wait))
        return best

    def queue_s(self, replica: str, load: int, now: float | None = None) -> float:
        """Seconds of work queued or running on ``replica`` (``inflight.py``): what remains
        of the requests this router sent it, plus ``request_s`` for each of ``load`` it did
        not send."""
        return self._inflight.queue_s(replica, load, now)

    def completed(self, replica: str, request_id: str) -> None:
        """A request this router sent has ended (finished, failed or cancelled)."""
        self._inflight.completed(replica, request_id)

    def _ready_at(self, replica: str, request: GenerateRequest) -> float:
        """When ``replica`` should hold ``request``'s prompt if it is sent there now: after
        the work queued there, and its prefill of what it lacks."""
        now = self._clock()
        queue = self.queue_s(replica, self._router(request.model).load(replica), now)
        return (
            now + queue + self.cost.prefill_s(len(request.tokens) - self._matched(replica, request))
        )

    def _matched(self, replica: str, request: GenerateRequest) -> int:
        """Prompt tokens the router believes ``replica`` holds (reported or credited)."""
        matches = self._router(request.model).directory.matches(request.chain)
        blocks = matches.get(replica, (0, 0))[0]
        n_prompt = len(request.tokens)
        return min(max(blocks * self.block, request.holders.get(replica, 0)), n_prompt - 1)

    def _expected_s(self, replica: str, request: GenerateRequest) -> float:
        n_prompt = len(request.tokens)
        matched = self._matched(replica, request)
        max_tokens = request.options.get("max_tokens")
        if self.decode_tok_per_s is None or not isinstance(max_tokens, int):
            generate = self.cost.request_s
        else:
            generate = max_tokens / self.decode_tok_per_s
        return self.cost.prefill_s(max(0, n_prompt - matched)) + generate

    def annotate(self, request: GenerateRequest, candidates: Sequence[str]) -> None:
        """Fill ``request.holders``: the candidates that reported holding a prefix of its
        prompt, with the tokens they hold (block-aligned, at most all but the last prompt
        token); and ``request.filling``: those the router sent a longer prefix of it than
        they reported (they may still be prefilling it), with when it expects them to hold
        it."""
        n_prompt = len(request.tokens)
        directory = self._reported.get(request.model)
        matches = directory.matches(request.chain) if directory is not None else {}
        request.holders = {
            replica: min(blocks * self.block, max(0, n_prompt - 1))
            for replica, (blocks, _) in matches.items()
            if replica in candidates
        }
        request.filling = {}
        now = self._clock()
        credited = self._router(request.model).directory.matches(request.chain)
        for replica, (blocks, _) in credited.items():
            tokens = min(blocks * self.block, max(0, n_prompt - 1))
            if replica not in candidates or tokens <= request.holders.get(replica, 0):
                continue
            ready_at = self._sent_ready_at(replica, request)
            if ready_at is not None:
                request.filling[replica] = (tokens, max(0.0, ready_at - now))

    def _sent_ready_at(self, replica: str, request: GenerateRequest) -> float | None:
        """When the prompt sharing the most blocks with ``request``'s that the router sent
        or chose ``replica`` should be held there (None: no such prompt)."""
        sent = [(c.model, c.chain, c.ready_at) for c in self._credits.get(replica, ())]
        sent += [
            (c.request.model, c.request.chain, c.ready_at)
            for c in self._chosen.values()
            if c.replica == replica
        ]
        best, ready = 0, None
        for model, chain, ready_at in sent:
            if model != request.model:
                continue
            common = 0
            for a, b in zip(chain, request.chain, strict=False):
                if a != b:
                    break
                common += 1
            if common > best or (common == best and ready is not None and ready_at < ready):
                best, ready = common, ready_at
        return ready if best > 0 else None

    def sent(self, replica: str, request: GenerateRequest, request_id: str | None = None) -> None:
        """The request went to ``replica``: count it there until its next report, credit
        it with the prompt's blocks for its next :data:`CREDIT_REPORTS` reports, remember
        its session, and (with ``request_id``, until :meth:`completed`) its work. A
        request :meth:`chose` placed there is already counted, and now confirmed."""
        self._expire_choices()
        choice = self._chosen.pop(request_id, None) if request_id is not None else None
        if choice is not None and request_id is not None and choice.replica != replica:
            self._undo(choice, request_id)  # Serve sent it elsewhere (its choice was full)
            choice = None
        if choice is None:
            ready_at = self._ready_at(replica, request)
            if request_id is not None:
                self._inflight.track(replica, request_id, self._expected_s(replica, request))
            self._router(request.model).sent(replica, request.chain)
        else:
            ready_at = choice.ready_at
        if request.chain:
            credits = self._credits.setdefault(replica, [])
            credits.append(_Credit(request.model, request.chain, CREDIT_REPORTS, ready_at))
            del credits[:-CREDIT_LIMIT]
        if request.session_id is not None:
            key = (request.model, request.session_id)
            self._sent_sessions[key] = replica
            self._sent_sessions.move_to_end(key)
            while len(self._sent_sessions) > SESSION_MEMORY:
                self._sent_sessions.popitem(last=False)

    def chose(self, replica: str, request: GenerateRequest, request_id: str) -> None:
        """The router placed the request on ``replica`` (its first choice): count it there
        now, as :meth:`sent` will, so that requests placed before Serve confirms this one
        see it. Undone if Serve does not confirm it within :data:`PROVISIONAL_S`, or sends
        it elsewhere. Choosing again for the same request replaces the earlier choice."""
        self._expire_choices()
        old = self._chosen.pop(request_id, None)
        if old is not None:
            self._undo(old, request_id)
        ready_at = self._ready_at(replica, request)
        self._chosen[request_id] = _Choice(replica, request, self._clock(), ready_at)
        self._inflight.track(replica, request_id, self._expected_s(replica, request))
        self._router(request.model).sent(replica, request.chain)

    def counted_by_serve(self, replica: str) -> None:
        """Serve sent a request to ``replica`` and counts it in its queue-length estimate
        from now on (it confirms it later): one unconfirmed choice there stops adding to
        that estimate, so the request is not counted twice."""
        for choice in self._chosen.values():
            if choice.replica == replica and not choice.counted:
                choice.counted = True
                return

    def _undo(self, choice: _Choice, request_id: str) -> None:
        """Stop counting a choice that was not sent (it is out of ``_chosen`` already)."""
        self.completed(choice.replica, request_id)
        router = self._router(choice.request.model)
        router.update(choice.replica, load=max(0, router.load(choice.replica) - 1))
        if choice.request.chain:  # its blocks: back to what was reported, plus credits
            reported = self._reported.get(choice.request.model)
            held = reported.held(choice.replica) if reported is not None else {}
            router.update(choice.replica, held=held)
            self._recredit(choice.replica)

    def _expire_choices(self) -> None:
        now = self._clock()
        while self._chosen:
            request_id, choice = next(iter(self._chosen.items()))
            if now - choice.at < PROVISIONAL_S:
                break
            del self._chosen[request_id]
            self._undo(choice, request_id)

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
