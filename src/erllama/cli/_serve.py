"""``erllama serve``: the HTTP server, until Ctrl-C or SIGTERM.

The engine is opened here, around the server, not in the ASGI app's lifespan: the engine
then lives exactly as long as the serving does, and a failing engine stops the server the
same way on asyncio and trio (a lifespan-held engine kept serving on asyncio after its task
group failed). See docs/server.md.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import TYPE_CHECKING

import anyio

from ..bundled import INSTALL_HINT, bundled_model_path
from ..config import ModelConfig, ToolCallMarkers
from ._chat import chat_cache_config
from ._console import Console

if TYPE_CHECKING:
    from ..server import ServeConfig

__all__ = ["SERVER_EXTRA_HINT", "serve", "serve_config"]

SERVER_EXTRA_HINT = "pip install 'erllama[server]'"
#: Options that describe the one model served without --config.
MODEL_OPTIONS = ("model", "model_id", "n_ctx", "threads", "gpu_layers", "cache_dir")


class ServeArgumentError(Exception):
    """A combination of options that cannot work (reported like any bad argument)."""


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The config the options describe: the ``--config`` file, or the one model given by
    ``--model`` (default: the bundled SmolLM2); then --host, --port, --max-tokens and API
    keys (``--api-key``, ``ERLLAMA_API_KEY``) on top. ConfigError names a bad key."""
    from ..server import API_KEY_ENV, ServeConfig, load_serve_config

    if args.config is not None:
        given = [o for o in MODEL_OPTIONS if getattr(args, o) is not None]
        if given:
            flags = ", ".join("--" + o.replace("_", "-") for o in given)
            raise ServeArgumentError(f"{flags}: set the model in the --config file instead")
        config = load_serve_config(args.config)
    else:
        path = args.model if args.model is not None else bundled_model_path()
        if path is None:
            raise ServeArgumentError(
                f"no --model or --config given and the bundled SmolLM2 is not installed "
                f"({INSTALL_HINT})"
            )
        model_id = args.model_id or ("smollm2" if args.model is None else path.stem)
        model = ModelConfig(
            model_path=path,
            n_ctx=args.n_ctx or 2048,
            n_threads=args.threads,
            n_gpu_layers=args.gpu_layers or 0,
            # Hermes-style calls, so tool_choice "required" works on any chat model.
            tool_call_markers=ToolCallMarkers(start="<tool_call>", end="</tool_call>"),
        )
        config = ServeConfig(cache=chat_cache_config(args.cache_dir), models={model_id: model})
    changes: dict[str, object] = {}
    for option, field in (("host", "host"), ("port", "port"), ("max_tokens", "max_tokens")):
        value = getattr(args, option)
        if value is not None:
            changes[field] = value
    keys = list(config.server.api_keys) + list(args.api_key)
    env_key = os.environ.get(API_KEY_ENV)
    if env_key:
        keys.append(env_key)
    if keys:
        changes["api_keys"] = tuple(dict.fromkeys(keys))
    return config.with_server(**changes) if changes else config


async def serve(args: argparse.Namespace, console: Console) -> int:
    from ..engine import open_engine
    from ..server import open_server

    config: ServeConfig = args.serve_config
    names = ", ".join(config.models) or "none"
    console.note(f"erllama serve: loading models ({names}) ...")
    async with (
        open_engine(config.engine_config()) as engine,
        open_server(engine, config) as server,
    ):
        # From here on Ctrl-C and SIGTERM stop the server gracefully (before, Ctrl-C
        # interrupts the load as in every command).
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            auth = "API key required" if config.server.api_keys else "no API key"
            console.note(f"erllama serve: listening on {server.url} ({auth}); Ctrl-C stops")
            async for signum in signals:
                console.note(f"erllama serve: {signal.Signals(signum).name}, stopping")
                break
    return 0
