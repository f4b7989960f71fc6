"""The HTTP ingress: ``erllama serve``'s app (every OpenAI, Anthropic and Ollama route, errors,
streaming, disconnects, metrics, admin) over a :class:`~erllama.ray.fleet.FleetEngine`.

The router of the replicas' handle runs in this process, so every generation request is
placed by it; the app itself is :func:`erllama.server.build_app`, unchanged.
"""

from __future__ import annotations

from typing import Any

import attrs
from starlette.applications import Starlette

from ..cluster import BLOCK
from ..server import ServeConfig, build_app
from ._owner import Owner
from .fleet import FleetEngine, open_fleet

__all__ = ["Ingress", "IngressSettings"]


@attrs.frozen(kw_only=True)
class IngressSettings:
    block: int = BLOCK
    #: How often the fleet view (models, queues, counters) is refreshed.
    refresh_s: float = 1.0


class Ingress:
    """The deployment class (``app.py`` wraps it in ``serve.ingress`` and
    ``serve.deployment``)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, config: ServeConfig, replicas: Any, settings: IngressSettings | None = None
    ) -> None:
        settings = settings or IngressSettings()
        self.config = config
        self._owner: Owner[FleetEngine] = Owner(
            lambda: open_fleet(
                replicas,
                config.engine_config(),
                block=settings.block,
                refresh_s=settings.refresh_s,
            )
        )
        self.fleet = await self._owner.start()

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_app(self.fleet, self.config)

    async def __del__(self) -> None:
        await self._owner.stop()

    def check_health(self) -> None:
        if not self._owner.alive:
            raise RuntimeError("the ingress's engine has closed")
