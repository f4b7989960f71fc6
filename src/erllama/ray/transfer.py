"""Moving a cache row from the replica that holds it to the one a request was sent to.

The router sometimes places a request on a replica that lacks a prefix another replica
holds (the holder is busy). The receiving replica may then fetch the holder's row through
Ray's object store instead of prefilling, but only when that is faster:

    transfer time  = latency + row tokens x bytes per token / bandwidth
    prefill saved  = (holder's prefix - own prefix) / prefill rate

Bandwidth and bytes per token are learnt from earlier transfers (and bytes per token from
the replica's own rows), the prefill rate from the replica's own requests; until then the
defaults are conservative (a slow link, a large KV per token). The row is imported with
``Engine.import_row``, which validates it exactly as a row file read from disk, and the
request then restores it like any local row.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["TransferPolicy"]


#: How late a row still being prefilled may be, past when the router expected it, before a
#: replica stops waiting for it: the larger of these (seconds, and a fraction of the time
#: the replica would take to prefill it: the router's estimate is as rough as its rates).
FILL_SLACK_S = 0.1
FILL_SLACK = 0.5


def _ewma(old: float, sample: float, weight: float) -> float:
    return old + weight * (sample - old)


@attrs.define
class TransferPolicy:
    """Whether fetching a prefix beats prefilling it; learns from what it measures."""

    #: Prompt tokens this replica prefills per second.
    prefill_tok_per_s: float = 200.0
    #: Bytes per second a row moves between replicas (object store, both ends).
    bandwidth_bytes_per_s: float = 50e6
    #: Bytes of a row per token it holds.
    bytes_per_token: float = 256 * 1024
    #: Fixed cost of one transfer (two calls and an object-store hop).
    latency_s: float = 0.02
    #: Below this many saved tokens a transfer is never worth its round trips.
    min_tokens: int = 64
    #: Weight of a new measurement in the running averages.
    weight: float = 0.3
    transfers: int = 0
    failures: int = 0

    def transfer_s(self, row_tokens: int) -> float:
        return self.latency_s + row_tokens * self.bytes_per_token / self.bandwidth_bytes_per_s

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tok_per_s

    def worth_it(self, own_tokens: int, holder_tokens: int) -> bool:
        """Fetch a row of ``holder_tokens`` when this replica holds ``own_tokens`` of the
        prompt? Only the difference is saved, but the whole row moves."""
        saved = holder_tokens - own_tokens
        return saved >= self.min_tokens and self.transfer_s(holder_tokens) < self.prefill_s(saved)

    def moved(self, n_bytes: int, n_tokens: int, seconds: float) -> None:
        """A row of ``n_tokens`` tokens and ``n_bytes`` bytes arrived ``seconds`` after it
        was asked for. The whole time counts against the bandwidth (conservative)."""
        self.transfers += 1
        if n_tokens > 0:
            self.bytes_per_token = _ewma(self.bytes_per_token, n_bytes / n_tokens, self.weight)
        if seconds > 0:
            self.bandwidth_bytes_per_s = _ewma(
                self.bandwidth_bytes_per_s, n_bytes / seconds, self.weight
            )

    def prefilled(self, n_tokens: int, seconds: float) -> None:
        """A request of this replica prefilled ``n_tokens`` in ``seconds``."""
        if n_tokens >= self.min_tokens and seconds > 0:
            self.prefill_tok_per_s = _ewma(self.prefill_tok_per_s, n_tokens / seconds, self.weight)

    def rows_held(self, n_bytes: int, n_tokens: int) -> None:
        """This replica's own rows: ``n_bytes`` for ``n_tokens`` tokens in all. Until a
        transfer is measured, they say what a row weighs per token."""
        if self.transfers == 0 and n_tokens > 0:
            self.bytes_per_token = n_bytes / n_tokens

    def best_holder(
        self, holders: Mapping[str, int], me: str, own_tokens: int
    ) -> tuple[str, int] | None:
        """The holder worth fetching from (the longest prefix), if any."""
        others = [(tokens, replica) for replica, tokens in holders.items() if replica != me]
        if not others:
            return None
        tokens, replica = max(others)
        if not self.worth_it(own_tokens, tokens):
            return None
        return replica, tokens

    def saving_s(self, own_tokens: int, holder_tokens: int) -> float:
        """Seconds a fetch of ``holder_tokens`` saves over prefilling (negative: it costs)."""
        return self.prefill_s(holder_tokens - own_tokens) - self.transfer_s(holder_tokens)

    def best_filling(
        self, filling: Mapping[str, tuple[int, float]], me: str, own_tokens: int
    ) -> tuple[str, int, float, float] | None:
        """The replica worth waiting for, among those still prefilling a prefix
        (``GenerateRequest.filling``): (replica, its tokens, how long to wait for the row at
        most, the seconds it should save). Waiting pays when the row should arrive and
        move before this replica would have prefilled it; the wait is bounded by that, and
        by the expected time with some slack (a row that is late may never come: the
        holder's saved rows need not end where this prompt's prefix does, and then the
        time waited is lost)."""
        best: tuple[str, int, float, float] | None = None
        for replica, (tokens, ready_in) in filling.items():
            if replica == me or tokens - own_tokens < self.min_tokens:
                continue
            margin = self.saving_s(own_tokens, tokens)
            saves = margin - ready_in
            if saves <= 0 or (best is not None and saves <= best[3]):
                continue
            wait_s = min(margin, ready_in + max(FILL_SLACK_S, FILL_SLACK * margin))
            best = (replica, tokens, wait_s, saves)
        return best
