"""A fleet of three stub replicas on the session's Ray instance, driven through a handle
from the test process (so the router runs here, and tests can ask it where a request
would go without sending it)."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

import erllama
from erllama.server import ServeConfig, ServerConfig

from ..helpers import stub_config

# erllama.ray needs the ray extra; without it there is nothing here to test.
collect_ignore_glob = [] if importlib.util.find_spec("ray") else ["test_*.py"]

#: The cost model the fleet routes with: a queued request costs 5 s, prefill 1,000 tok/s,
#: so a busy holder of a 256-token prefix loses to an idle replica without it.
ROUTER_KWARGS = {"request_s": 5.0, "prefill_tok_per_s": 1000.0}


def fleet_models() -> dict[str, erllama.ModelConfig]:
    return {
        # No live KV kept: what a replica holds is exactly its cache rows.
        "m": stub_config(n_ctx=2048, n_seq_max=4, keep_live_kv=False),
        # 16 prompt tokens per 20 ms step: prefilling is slow enough to be worth a fetch.
        "slow": stub_config(n_ctx=2048, prefill_chunk=16, keep_live_kv=False, step_delay_s=0.02),
    }


def fleet_config() -> ServeConfig:
    return ServeConfig(
        server=ServerConfig(port=0, admin_backends=("stub",)),
        cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=None),
        models=fleet_models(),
    )


@attrs.frozen
class Fleet:
    handle: Any
    url: str

    def replicas(self) -> list[str]:
        """Every replica's id (from their routing stats)."""
        stats = self.handle.broadcast("record_routing_stats").results(timeout_s=30)
        return sorted(s["replica"] for s in stats)

    def stats(self, replica: str) -> dict[str, Any]:
        for s in self.handle.broadcast("record_routing_stats").results(timeout_s=30):
            if s["replica"] == replica:
                return dict(s)
        raise KeyError(replica)


@pytest.fixture(scope="session")
def fleet(ray_serve: Any) -> Iterator[Fleet]:
    from ray import serve

    from erllama.ray import ScaleOut, TransferPolicy, build_application

    scale = ScaleOut(
        replicas=3,
        max_ongoing_requests=8,
        router_kwargs=ROUTER_KWARGS,
        stats_period_s=0.3,
        # Stub rows weigh a few bytes per token: say so, or the conservative default
        # (256 KiB per token) would make every fetch look slower than prefilling.
        policy=TransferPolicy(bytes_per_token=64),
    )
    with ray_serve.deployed("fleet", build_application(fleet_config(), scale)) as url:
        handle = serve.get_deployment_handle(scale.replica_name, app_name="fleet")
        yield Fleet(handle, url)


_serial = itertools.count()


def fresh_tokens(n: int) -> list[int]:
    """A prompt of ``n`` stub tokens (BOS, then words) that no other test's prompt shares
    a block with: its second token is its own (block hashes chain, so every block differs).

    Never runs out: tests that ask again until something happens take fresh prompts each
    time (a fixed pool of 36 ran out in CI while one waited for a replica to wind down)."""
    from erllama.backends.stub import BOS, WORD_BASE

    k = next(_serial)
    start = WORD_BASE + 5_000 + (k * 700) % 25_000
    return [BOS, WORD_BASE + k, *range(start, start + n - 2)]
