"""erllama's cache-aware router as a Ray Serve ``RequestRouter``.

Serve runs it in every process that holds a handle to the replicas (the ingress, and each
replica that fetches rows from the others), on a loop of its own. For a generation request
(:class:`~erllama.ray.wire.GenerateRequest`) it ranks replicas with
:class:`~erllama.ray.placement.Placement`: exact token prefixes from the replicas' routing
stats, weighed against Serve's queue-length estimates. Any request with a ``pin`` goes to
that replica. Everything else goes to the least loaded.

Two Serve facts shape it. ``choose_replicas`` must never raise: the request would hang
forever (Serve only logs the error), so every failure falls back to all candidates. And
Serve pickles this module *by value* into the processes that route, so it holds no state
of its own at module level; the logic lives in ``placement.py``, imported normally.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from ..cluster import BLOCK, CostModel
from .placement import FetchCost, Placement
from .wire import GenerateRequest

__all__ = ["CacheAwareRouter"]

log = logging.getLogger("erllama.ray.router")


class CacheAwareRouter(RequestRouter):
    """Token-exact, cache-aware placement (see the module docstring).

    ``request_router_kwargs`` (all optional): ``prefill_tok_per_s`` and ``request_s`` (the
    cost model: prompt tokens a replica prefills per second, and the typical time one
    queued request holds a replica), ``block`` (tokens per hashed block; the replicas'
    summaries must use the same), ``decode_tok_per_s`` (count each replica's queue in
    seconds of the work this router sent it, not in requests), and when replicas fetch
    rows from each other, ``fetch_s_per_token`` and ``fetch_latency_s`` (what a fetch
    costs: without them the router places requests as if rows never moved)."""

    def initialize_state(
        self,
        prefill_tok_per_s: float = 200.0,
        request_s: float = 1.0,
        block: int = BLOCK,
        decode_tok_per_s: float | None = None,
        fetch_s_per_token: float | None = None,
        fetch_latency_s: float = 0.02,
        **_: Any,
    ) -> None:
        cost = CostModel(prefill_tok_per_s=prefill_tok_per_s, request_s=request_s)
        fetch = None
        if fetch_s_per_token is not None:
            fetch = FetchCost(fetch_s_per_token, fetch_latency_s, min_tokens=block)
        self._placement = Placement(cost, block, fetch, decode_tok_per_s=decode_tok_per_s)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for r in replicas:
            try:
                self._placement.report(
                    r.replica_id.unique_id, r.routing_stats, r.max_ongoing_requests
                )
            except Exception:
                log.exception("erllama router: bad routing stats from %s", r.replica_id)
        try:
            self._placement.keep_only([r.replica_id.unique_id for r in replicas])
        except Exception:
            log.exception("erllama router: could not forget replicas that left")

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            return self._choose(candidate_replicas, pending_request)
        except Exception:
            log.exception("erllama router: placement failed; any replica will do")
            return [candidate_replicas]

    def _choose(
        self, candidates: list[RunningReplica], pending: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        request = _request_of(pending)
        if request is None:
            return [candidates]
        by_id = {r.replica_id.unique_id: r for r in candidates}
        pin = getattr(request, "pin", None)
        if pin is not None:
            pinned = by_id.get(pin)
            if pinned is None:
                return [candidates]
            if isinstance(request, GenerateRequest):
                self._placement.annotate(request, list(by_id))
                self._chose(pin, request, pending)
            return [[pinned]]
        if not isinstance(request, GenerateRequest):
            return [candidates]
        cache = self._replica_queue_len_cache
        loads = {uid: cache.get(r.replica_id) for uid, r in by_id.items()}
        groups = self._placement.order(request, list(by_id), loads)
        if groups and groups[0]:
            # Serve takes the first group's replica unless it is full: count it there now,
            # before Serve confirms the send (see Placement.chose).
            self._chose(groups[0][0], request, pending)
        return [[by_id[uid] for uid in group] for group in groups]

    def _chose(
        self, replica: str, request: GenerateRequest, pending: PendingRequest | None
    ) -> None:
        metadata = getattr(pending, "metadata", None)
        request_id = getattr(metadata, "internal_request_id", None)
        if isinstance(request_id, str):
            self._placement.chose(replica, request, request_id)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        try:
            self._placement.counted_by_serve(replica_id.unique_id)
            self._placement.serve_estimate_changed(replica_id.unique_id)
        except Exception:
            log.exception("erllama router: could not record a sent request")

    # Serve's queue-length estimate changes through these two as well: Placement weighs it
    # against the replicas' reports by which is newer (Placement._load_now).
    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        super().on_new_queue_len_info(replica_id, num_ongoing_requests)
        self._estimate_changed(replica_id)

    def decrement_queue_len_cache(self, replica_id: ReplicaID) -> None:
        super().decrement_queue_len_cache(replica_id)
        self._estimate_changed(replica_id)

    def _estimate_changed(self, replica_id: ReplicaID) -> None:
        try:
            self._placement.serve_estimate_changed(replica_id.unique_id)
        except Exception:
            log.exception("erllama router: could not record a queue-length change")

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        try:
            request = _request_of(pending_request)
            if isinstance(request, GenerateRequest):
                request_id = pending_request.metadata.internal_request_id
                self._placement.sent(replica_id.unique_id, request, request_id)
        except Exception:
            log.exception("erllama router: could not record a routed request")

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        try:
            self._placement.completed(replica_id.unique_id, internal_request_id)
        except Exception:
            log.exception("erllama router: could not record a completed request")


def _request_of(pending: PendingRequest | None) -> Any:
    if pending is None or not pending.args:
        return None
    return pending.args[0]
