"""``erllama serve``: OpenAI- (the Responses API too), Anthropic- and Ollama-compatible HTTP
over one engine.

    async with erllama.open_engine(config.engine_config()) as engine:
        async with open_server(engine, config) as server:
            print(server.url)
            await anyio.sleep_forever()

Needs the ``server`` extra (Starlette, Hypercorn, prometheus_client). See docs/server.md.
"""

from .app import build_app as build_app
from .config import ADMIN_KEY_ENV as ADMIN_KEY_ENV
from .config import API_KEY_ENV as API_KEY_ENV
from .config import ServeConfig as ServeConfig
from .config import ServerConfig as ServerConfig
from .config import load_serve_config as load_serve_config
from .run import RunningServer as RunningServer
from .run import open_server as open_server
from .run import serve_http as serve_http

__all__ = [
    "ADMIN_KEY_ENV",
    "API_KEY_ENV",
    "RunningServer",
    "ServeConfig",
    "ServerConfig",
    "build_app",
    "load_serve_config",
    "open_server",
    "serve_http",
]
