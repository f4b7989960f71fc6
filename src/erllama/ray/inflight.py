"""What one router sent each replica and has not seen complete, as seconds of work.

A replica's load counts requests; the router knows more about the ones it sent itself: when,
and how long each should take there (prefill of what the replica lacked, then its reply).
``queue_s`` turns that into the seconds a new request would wait. Requests other routers
sent are known only by count and weigh ``request_s`` each.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

__all__ = ["INFLIGHT_GRACE_S", "INFLIGHT_LIMIT", "InFlight"]

#: Requests per replica whose work is tracked (the most recent), and how long past its
#: expected end one is kept when its completion is never heard of.
INFLIGHT_LIMIT = 1024
INFLIGHT_GRACE_S = 60.0


@attrs.define
class _Work:
    """A request sent and not yet seen complete: when, and its expected time there."""

    sent_at: float
    seconds: float


class InFlight:
    """Per replica, request id -> its expected work; event-loop (or one thread) only."""

    def __init__(self, request_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.request_s = request_s
        self._clock = clock
        self._work: dict[str, dict[str, _Work]] = {}

    def queue_s(self, replica: str, load: int, now: float | None = None) -> float:
        """Seconds of work queued or running on ``replica``: what remains of the requests
        sent there (their expected times, less the time since the oldest was sent), plus
        ``request_s`` for each of ``load`` not tracked here."""
        now = self._clock() if now is None else now
        work = self._work.get(replica)
        if not work:
            return load * self.request_s
        oldest = min(w.sent_at for w in work.values())
        remaining = max(0.0, sum(w.seconds for w in work.values()) - (now - oldest))
        return remaining + max(0, load - len(work)) * self.request_s

    def count(self, replica: str) -> int:
        """Requests sent to ``replica`` and not yet seen complete."""
        return len(self._work.get(replica, ()))

    def track(self, replica: str, request_id: str, seconds: float) -> None:
        """``request_id`` went to ``replica`` now and should take ``seconds`` there."""
        now = self._clock()
        work = self._work.setdefault(replica, {})
        for stale in [k for k, w in work.items() if now - w.sent_at > w.seconds + INFLIGHT_GRACE_S]:
            del work[stale]  # its completion was never heard of
        work[request_id] = _Work(now, seconds)
        while len(work) > INFLIGHT_LIMIT:
            del work[next(iter(work))]

    def completed(self, replica: str, request_id: str) -> None:
        """The request has ended (finished, failed or cancelled), or was never sent."""
        work = self._work.get(replica)
        if work is not None:
            work.pop(request_id, None)

    def forget(self, replica: str) -> None:
        """The replica is gone."""
        self._work.pop(replica, None)
