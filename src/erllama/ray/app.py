"""Building the Serve application: N replicas behind a router, and the HTTP ingress.

    app = build_application(serve_config, ScaleOut(replicas=3))
    serve.run(app, name="erllama", route_prefix="/")

or from the command line, ``erllama serve --ray --replicas 3``, or with Serve's own CLI
(``serve run erllama.ray.app:app_builder config=serve.toml replicas=3``). See
docs/scale-out.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import attrs
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..cluster import BLOCK
from ..server import ServeConfig, load_serve_config
from .ingress import Ingress, IngressSettings
from .replica import Replica, ReplicaSettings
from .router import CacheAwareRouter
from .transfer import TransferPolicy

__all__ = [
    "ROUTERS",
    "ScaleOut",
    "app_builder",
    "build_application",
    "build_replicas",
    "router_config",
    "wait_until_serving",
]

#: Routers by name: erllama's, and Ray's own for comparison.
ROUTERS: Mapping[str, Any] = {
    "erllama": CacheAwareRouter,
    "round_robin": "ray.serve.experimental.round_robin_router:RoundRobinRouter",
    "prefix_affinity": "ray.llm._internal.serve.routing_policies.prefix_aware."
    "prefix_aware_router:PrefixCacheAffinityRouter",
    "pow2": None,  # Serve's default: power of two choices
}


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class ScaleOut:
    """How the replicas are deployed (the models, cache and server settings come from the
    :class:`~erllama.server.ServeConfig`)."""

    replicas: int = attrs.field(default=2, validator=_positive)
    #: Requests Serve lets a replica hold at once (queued in its engine or running). More
    #: than the engine runs at once, so a busy replica still answers row fetches.
    max_ongoing_requests: int = attrs.field(default=16, validator=_positive)
    #: CPUs Ray reserves per replica (0 lets replicas share a small machine).
    num_cpus: float = 0.0
    #: A name in :data:`ROUTERS`, or an import path ``module:Class``.
    router: str = "erllama"
    #: ``request_router_kwargs`` (for erllama's: ``prefill_tok_per_s``, ``request_s``).
    router_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    #: How often replicas report what they hold.
    stats_period_s: float = attrs.field(default=1.0, validator=_positive)
    summary_limit: int = 4096
    block: int = BLOCK
    #: Fetch rows between replicas when that beats prefilling.
    transfer: bool = True
    policy: TransferPolicy = attrs.Factory(TransferPolicy)
    #: Names of the two deployments.
    replica_name: str = "Replica"
    ingress_name: str = "Ingress"


def router_config(scale: ScaleOut) -> RequestRouterConfig:
    router = ROUTERS.get(scale.router, scale.router)
    kwargs: dict[str, Any] = dict(scale.router_kwargs)
    if router is CacheAwareRouter:
        kwargs.setdefault("block", scale.block)
    options: dict[str, Any] = {
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": scale.stats_period_s,
        "request_routing_stats_timeout_s": max(2.0, 4 * scale.stats_period_s),
    }
    if router is not None:
        options["request_router_class"] = router
    return RequestRouterConfig(**options)


def build_replicas(config: ServeConfig, scale: ScaleOut | None = None) -> Any:
    """The replicas alone, without HTTP (``serve.run(..., route_prefix=None)`` returns a
    handle whose router places requests in the calling process): ``scale.replicas``
    engines of ``config``'s models, each with cache folders of its own."""
    scale = scale or ScaleOut()
    settings = ReplicaSettings(
        engine=config.engine_config(),
        summary_limit=scale.summary_limit,
        block=scale.block,
        transfer=scale.transfer,
        policy=scale.policy,
    )
    replica = serve.deployment(
        name=scale.replica_name,
        num_replicas=scale.replicas,
        max_ongoing_requests=scale.max_ongoing_requests,
        ray_actor_options={"num_cpus": scale.num_cpus},
        request_router_config=router_config(scale),
        graceful_shutdown_timeout_s=30,
    )(Replica)
    return replica.bind(settings)


def build_application(config: ServeConfig, scale: ScaleOut | None = None) -> Any:
    """The Serve application (``serve.run`` it): the replicas of :func:`build_replicas`,
    and the ingress serving ``config.server``'s routes over them."""
    scale = scale or ScaleOut()
    ingress = serve.deployment(
        name=scale.ingress_name,
        num_replicas=1,
        # The ingress holds every open stream; the replicas' own limits apply behind it.
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(Ingress))
    settings_in = IngressSettings(block=scale.block, refresh_s=scale.stats_period_s)
    return ingress.bind(config, build_replicas(config, scale), settings_in)


def app_builder(args: Mapping[str, str]) -> Any:
    """For ``serve run erllama.ray.app:app_builder config=FILE replicas=N router=NAME``:
    ``config`` is an ``erllama serve`` TOML file (its ``[server]`` host and port are
    Serve's business there: give them to ``serve run``'s config instead)."""
    known = {"config", "replicas", "router", "max_ongoing_requests", "num_cpus"}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(known)}")
    config = load_serve_config(args["config"]) if "config" in args else ServeConfig()
    scale = ScaleOut(
        replicas=int(args.get("replicas", 2)),
        router=str(args.get("router", "erllama")),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 16)),
        num_cpus=float(args.get("num_cpus", 0)),
    )
    return build_application(config, scale)


def wait_until_serving(app_name: str, timeout_s: float = 120.0) -> None:
    """Block until Serve reports ``app_name`` RUNNING (RuntimeError on failure or timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", ""))
        if status.endswith("RUNNING"):
            return
        if app is not None and status.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"the Serve application {app_name!r} failed: {app.message}")
        time.sleep(0.2)
    raise RuntimeError(f"the Serve application {app_name!r} did not start in {timeout_s:.0f} s")
