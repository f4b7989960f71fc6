"""erllama on Ray Serve: N engine replicas behind a token-exact, cache-aware router, and an
ingress serving the same OpenAI-, Anthropic- and Ollama-compatible routes as ``erllama serve``.

    from ray import serve
    from erllama.ray import ScaleOut, build_application
    serve.run(build_application(serve_config, ScaleOut(replicas=3)), route_prefix="/")

Needs the ``ray`` extra (``pip install 'erllama[ray]'``). See docs/scale-out.md.
"""

from .app import ROUTERS as ROUTERS
from .app import ScaleOut as ScaleOut
from .app import app_builder as app_builder
from .app import build_application as build_application
from .app import build_replicas as build_replicas
from .placement import Placement as Placement
from .router import CacheAwareRouter as CacheAwareRouter
from .transfer import TransferPolicy as TransferPolicy

__all__ = [
    "ROUTERS",
    "CacheAwareRouter",
    "Placement",
    "ScaleOut",
    "TransferPolicy",
    "app_builder",
    "build_application",
    "build_replicas",
]
