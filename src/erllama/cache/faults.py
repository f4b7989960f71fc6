"""Logging failed cache writes without flooding the log.

A failing tier usually keeps failing (a full disk fails every save until space is freed), so
a traceback per write says nothing new after the first and buries everything else: one run
on a full disk logged 156. The first failure is logged in full, with its cause and traceback;
later ones are counted and summarised in one line at most every ``interval_s`` seconds, and
whatever is still pending when the cache closes is summarised then.
"""

from __future__ import annotations

import logging

import attrs

__all__ = ["WriteFailures"]


def describe(exc: BaseException) -> str:
    """``OSError: [Errno 28] No space left on device``: the cause in one line."""
    return f"{type(exc).__name__}: {exc}"


@attrs.define(eq=False)
class WriteFailures:
    """Rate-limited reporting of failed writes. Touched only on the event loop."""

    log: logging.Logger
    #: At most one summary line per this many seconds.
    interval_s: float
    #: Failures since the first, not yet summarised.
    pending: int = 0
    last_cause: str = ""
    _seen_any: bool = False
    _last_report: float = 0.0

    def note(self, exc: BaseException, what: str, now: float) -> None:
        """Record one failed write of ``what`` (a row and tier, for the message) at ``now``
        (a monotonic clock in seconds)."""
        if not self._seen_any:
            self._seen_any = True
            self._last_report = now
            self.log.error(
                "cache write failed (%s): %s; further failures are summarised at most every %.0f s",
                what,
                describe(exc),
                self.interval_s,
                exc_info=exc,
            )
            return
        self.pending += 1
        self.last_cause = describe(exc)
        if now - self._last_report >= self.interval_s:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Summarise the failures not yet reported, if any."""
        if self.pending:
            self.log.error("%d more cache writes failed (last: %s)", self.pending, self.last_cause)
            self.pending = 0
        self._last_report = now
