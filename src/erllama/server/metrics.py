"""Prometheus metrics for ``GET /metrics``, on a registry of the app's own.

Two kinds: what the server counts as requests pass (requests by model and outcome, time to
first token, duration, tokens, cache outcome per request), and what the engine reports,
read at scrape time by :class:`EngineCollector` (queue depth, KV bytes and rows per tier,
cache lookups and saves, pressure rounds). The registry is private to one app (never
prometheus_client's global one), so two servers in one process never collide. Every name
is listed in docs/server.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..events import Stats

if TYPE_CHECKING:
    from .port import EnginePort
    from .transport import TransportStats

__all__ = ["EngineCollector", "Metrics", "Outcome", "Track", "TransportCollector"]

#: How a generation request ended: a finish reason, or why it did not finish.
Outcome = Literal[
    "stop",
    "length",
    "tool_calls",
    "cancelled",  # the engine ended it (unload, shutdown)
    "disconnected",  # the client went away
    "stalled",  # the client stopped reading (server.send_timeout_s, stream_buffer_bytes)
    "invalid",  # a 4xx for the request itself (bad parameter, unknown model)
    "rejected",  # queue full, session busy, model loading or failed (409, 429, 503)
    "error",  # a failure while generating, or a 5xx
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's metrics and the registry that exposes them."""

    def __init__(
        self, engine: EnginePort | None = None, transport: TransportStats | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter(
            "erllama_http_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "erllama_requests",
            "Generation requests by API, model and outcome",
            ["api", "model", "outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "erllama_requests_in_flight", "Generation requests being served", ["api"], registry=r
        )
        self.ttft = Histogram(
            "erllama_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "erllama_request_duration_seconds",
            "From a generation request's arrival to its end",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated = Counter(
            "erllama_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.prompt = Counter(
            "erllama_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.drafted = Counter(
            "erllama_draft_tokens",
            "Speculative decoding: tokens drafted (ModelConfig.speculative)",
            ["model"],
            registry=r,
        )
        self.accepted = Counter(
            "erllama_draft_accepted_tokens",
            "Speculative decoding: drafted tokens the model accepted (each saved a pass)",
            ["model"],
            registry=r,
        )
        self.restored = Counter(
            "erllama_cache_restored_tokens",
            "Prompt tokens not prefilled: restored from the KV cache or a sequence's live KV",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "erllama_request_cache_hits",
            "Requests by how much of their prompt the cache held (exact, partial, cold)",
            ["model", "kind"],
            registry=r,
        )
        self.cache_misses = Counter(
            "erllama_cache_misses_by_cause",
            "Requests whose prompt was not wholly restored, by why (Stats.cache_explain: "
            "no_row, evicted, fingerprint, adapter, layout, diverged, extends, grid, policy, "
            "disabled)",
            ["model", "cause"],
            registry=r,
        )
        if engine is not None:
            r.register(EngineCollector(engine))
        if transport is not None:
            r.register(TransportCollector(transport))

    def track(self, api: str, model: str) -> Track:
        return Track(self, api, model)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The text format the scraper asked for (``Accept``), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class Track:
    """One generation request, from arrival to its one recorded outcome."""

    def __init__(self, metrics: Metrics, api: str, model: str) -> None:
        self._m = metrics
        self.api = api
        self.model = model
        self._start = time.monotonic()
        self._first: float | None = None
        self.outcome: Outcome | None = None
        metrics.in_flight.labels(api).inc()

    def first_token(self) -> None:
        if self._first is None:
            self._first = time.monotonic()
            self._m.ttft.labels(self.model).observe(self._first - self._start)

    def finished(self, outcome: Outcome, stats: Stats) -> None:
        if self.outcome is not None:
            return
        m, model = self._m, self.model
        m.generated.labels(model).inc(stats.completion_tokens)
        m.prompt.labels(model).inc(stats.prompt_tokens)
        m.drafted.labels(model).inc(stats.draft_tokens)
        m.accepted.labels(model).inc(stats.draft_accepted)
        m.restored.labels(model).inc(stats.cache_delta.read)
        m.cache_hits.labels(model, stats.cache_hit_kind).inc()
        explained = stats.cache_explain
        if explained is not None and explained.cause is not None:
            m.cache_misses.labels(model, explained.cause).inc()
        self.end(outcome)

    def end(self, outcome: Outcome) -> None:
        """Record the outcome (the first call wins)."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        m = self._m
        m.requests.labels(self.api, self.model, outcome).inc()
        m.duration.labels(self.model).observe(time.monotonic() - self._start)
        m.in_flight.labels(self.api).dec()

    def end_with(self, exc: BaseException | None) -> None:
        """Record the outcome an exception (or none: the client went away) implies."""
        from .errors import ApiError

        if exc is None or isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit)):
            self.end("disconnected")
        elif isinstance(exc, ApiError):
            if exc.status in (409, 429, 503):
                self.end("rejected")
            elif exc.status < 500:
                self.end("invalid")
            else:
                self.end("error")
        else:
            self.end("error")

    def end_midway(self, exc: BaseException) -> None:
        """Record a request that failed after it started generating."""
        if isinstance(exc, (anyio.get_cancelled_exc_class(), GeneratorExit)):
            self.end("disconnected")
        else:
            self.end("error")


class TransportCollector(Collector):
    """What the connection layer saw (transport.py), read at each scrape."""

    def __init__(self, stats: TransportStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield GaugeMetricFamily(
            "erllama_http_connections_open", "Open HTTP connections", value=s.open
        )
        connections = CounterMetricFamily(
            "erllama_http_connections",
            "Connections by what became of them at accept: served, refused with 503 at "
            "server.max_connections, or dropped unanswered (too many refusals at once)",
            labels=["outcome"],
        )
        for outcome, value in (
            ("accepted", s.accepted),
            ("refused", s.refused),
            ("dropped", s.dropped),
        ):
            connections.add_metric([outcome], value)
        yield connections
        yield CounterMetricFamily(
            "erllama_http_accept_errors",
            "accept() failures for lack of descriptors or memory",
            value=s.accept_errors,
        )
        timeouts = CounterMetricFamily(
            "erllama_http_timeouts",
            "Connections or requests ended because headers, a body or a write took too long",
            labels=["phase"],
        )
        for phase, value in (
            ("headers", s.header_timeouts),
            ("body", s.body_timeouts),
            ("send", s.send_timeouts),
        ):
            timeouts.add_metric([phase], value)
        yield timeouts


def _lifecycle(engine: EnginePort) -> Iterator[Metric]:
    """Every model the engine knows, loaded or not: state, last use, expiry, loads and
    unloads (Unix times, as Prometheus' ``time()``)."""
    state = GaugeMetricFamily(
        "erllama_model_state",
        "1 for each known model's lifecycle state (loaded, loading, unloading, unloaded, failed)",
        labels=["model", "state"],
    )
    last_used = GaugeMetricFamily(
        "erllama_model_last_used_timestamp_seconds",
        "When each model was last used (Unix time)",
        labels=["model"],
    )
    expires = GaugeMetricFamily(
        "erllama_model_expires_timestamp_seconds",
        "When each loaded model unloads if it stays idle (its keep-alive; absent: never)",
        labels=["model"],
    )
    loads = CounterMetricFamily(
        "erllama_model_loads", "Times each model was loaded", labels=["model"]
    )
    unloads = CounterMetricFamily(
        "erllama_model_unloads",
        "Times each model was unloaded, by reason (keep_alive, max_loaded_models, pressure, "
        "unload)",
        labels=["model", "reason"],
    )
    for m in engine.model_states():
        state.add_metric([m.id, m.state], 1)
        if m.last_used_at is not None:
            last_used.add_metric([m.id], m.last_used_at)
        if m.expires_at is not None:
            expires.add_metric([m.id], m.expires_at)
        loads.add_metric([m.id], m.loads)
        for reason, n in sorted(m.unloads.items()):
            unloads.add_metric([m.id, reason], n)
    yield from (state, last_used, expires, loads, unloads)


class EngineCollector(Collector):
    """What the engine reports, read at each scrape (never waits on a model)."""

    def __init__(self, engine: EnginePort) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        queue = GaugeMetricFamily(
            "erllama_queue_depth", "Requests queued or running, per model", labels=["model"]
        )
        status = GaugeMetricFamily(
            "erllama_model_status", "1 for each loaded model's current status",
            labels=["model", "status"],
        )  # fmt: skip
        for info in engine.list_models():
            queue.add_metric([info.id], info.queue_len + info.running)
            status.add_metric([info.id, info.status], 1)
        yield queue
        yield status
        yield from _lifecycle(engine)

        c = engine.cache_counters()
        kv_bytes = GaugeMetricFamily(
            "erllama_kv_cache_bytes", "Bytes of KV rows held, per tier", labels=["tier"]
        )
        kv_rows = GaugeMetricFamily(
            "erllama_kv_cache_rows", "KV rows held, per tier", labels=["tier"]
        )
        for tier in ("ram", "ram_file", "disk"):
            kv_bytes.add_metric([tier], getattr(c, f"bytes_{tier}"))
            kv_rows.add_metric([tier], getattr(c, f"rows_{tier}"))
        yield kv_bytes
        yield kv_rows
        lookups = CounterMetricFamily(
            "erllama_kv_cache_lookups",
            "Cache lookups at admission, by result",
            labels=["result"],
        )
        for result, value in (
            ("exact", c.hits_exact),
            ("resume", c.hits_resume),
            ("longest_prefix", c.hits_longest_prefix),
            ("live", c.hits_live),
            ("miss", c.misses),
        ):
            lookups.add_metric([result], value)
        yield lookups
        saves = CounterMetricFamily(
            "erllama_kv_cache_saves", "Rows saved, by reason", labels=["reason"]
        )
        for reason in ("cold", "continued", "finish", "evict", "shutdown"):
            saves.add_metric([reason], getattr(c, f"saves_{reason}"))
        yield saves
        for name, doc, value in (
            ("saves_dropped", "Saves dropped (writers busy, no room, or a failed write)", c.saves_dropped),
            ("evictions", "Rows deleted to make room", c.evictions),
            ("spills", "Rows moved down a tier", c.spills),
            ("corrupt_files", "Damaged rows found and removed", c.corrupt_files),
        ):  # fmt: skip
            yield CounterMetricFamily(f"erllama_kv_cache_{name}", doc, value=value)

        p = engine.pressure_status()
        yield CounterMetricFamily(
            "erllama_pressure_rounds", "Memory-pressure rounds run", value=p.rounds
        )
        yield CounterMetricFamily(
            "erllama_pressure_evicted_bytes",
            "Cache bytes the pressure scheduler evicted",
            value=p.evicted_bytes,
        )
        yield CounterMetricFamily(
            "erllama_pressure_unloaded_models",
            "Models the pressure scheduler unloaded",
            value=p.unloaded_models,
        )
        if p.last_ratio is not None:
            yield GaugeMetricFamily(
                "erllama_pressure_ratio",
                "Used/total memory of the fullest device at the last reading",
                value=p.last_ratio,
            )
