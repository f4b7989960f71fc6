"""``erllama serve``: the HTTP server, until Ctrl-C or SIGTERM.

The engine is opened here, around the server, not in the ASGI app's lifespan: the engine
then lives exactly as long as the serving does, and a failing engine stops the server the
same way on asyncio and trio (a lifespan-held engine kept serving on asyncio after its task
group failed). See docs/server.md.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from ..bundled import INSTALL_HINT, bundled_model_path
from ..config import ModelConfig, ToolCallMarkers
from ._chat import chat_cache_config
from ._console import Console
from ._parser import GPU_LAYERS, N_CTX, PARALLEL

if TYPE_CHECKING:
    from ..server import ServeConfig

__all__ = ["RAY_EXTRA_HINT", "SERVER_EXTRA_HINT", "serve", "serve_config", "serve_ray"]

SERVER_EXTRA_HINT = "pip install 'erllama[server]'"
RAY_EXTRA_HINT = "pip install 'erllama[ray]'"
#: The Serve application ``--ray`` deploys.
RAY_APP_NAME = "erllama"
#: How long stopping Serve may take before the command gives up on it.
RAY_SHUTDOWN_TIMEOUT_S = 60.0
#: Options that describe the one model served without --config.
MODEL_OPTIONS = (
    "model",
    "model_id",
    "n_ctx",
    "threads",
    "gpu_layers",
    "cache_dir",
    "parallel",
    "cache_type_k",
    "cache_type_v",
)


class ServeArgumentError(Exception):
    """A combination of options that cannot work (reported like any bad argument)."""


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The config the options describe: the ``--config`` file, or the one model given by
    ``--model`` (default: the bundled SmolLM2); then --host, --port, --max-tokens and API
    keys (``--api-key``, ``ERLLAMA_API_KEY``) on top. ConfigError names a bad key."""
    from ..server import ADMIN_KEY_ENV, API_KEY_ENV, ServeConfig, load_serve_config

    if not args.ray:
        given = [o for o in ("replicas", "router") if getattr(args, o) is not None]
        if given:
            flags = ", ".join("--" + o for o in given)
            raise ServeArgumentError(f"{flags}: only with --ray")
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
            n_ctx=N_CTX if args.n_ctx is None else args.n_ctx,
            n_threads=args.threads,
            n_gpu_layers=GPU_LAYERS if args.gpu_layers is None else args.gpu_layers,
            n_seq_max=PARALLEL if args.parallel is None else args.parallel,
            # Hermes-style calls, so tool_choice "required" works on any chat model.
            tool_call_markers=ToolCallMarkers(start="<tool_call>", end="</tool_call>"),
            # The KV types given (-ctk/-ctv); ModelConfig's defaults otherwise.
            **{
                field: value
                for field, value in (("type_k", args.cache_type_k), ("type_v", args.cache_type_v))
                if value is not None
            },
        )
        config = ServeConfig(cache=chat_cache_config(args.cache_dir), models={model_id: model})
    changes: dict[str, object] = {}
    for option in ("host", "port", "max_tokens", "max_connections", "admin", "default_model"):
        value = getattr(args, option, None)
        if value is not None:
            changes[option] = value
    for option, field, env in (
        ("api_key", "api_keys", API_KEY_ENV),
        ("admin_key", "admin_keys", ADMIN_KEY_ENV),
    ):
        keys = list(getattr(config.server, field)) + list(getattr(args, option, []))
        env_key = os.environ.get(env)
        if env_key:
            keys.append(env_key)
        if keys:
            changes[field] = tuple(dict.fromkeys(keys))
    return config.with_server(**changes) if changes else config


def configure_logging(level: str) -> None:
    """The command's log on stderr (the library configures none): at ``info``, a line per
    request (``erllama.server.access``) and each server-side failure with its cause."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Hypercorn's own access log is off (transport.py); llama.cpp's chatter stays at DEBUG.


def listen(host: str, port: int, console: Console) -> socket.socket | None:
    """The listening socket, bound before any model loads: a port in use (or an address
    not ours) is one line and exit status 2, not a traceback after every model loaded.
    None when it cannot be bound (said on ``console``)."""
    from ..server.run import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        console.note(f"erllama serve: cannot listen on {host}:{port}: {why or exc}")
        return None


@asynccontextmanager
async def _closing(sock: socket.socket) -> AsyncIterator[None]:
    """The socket closed however the serving ends (a load that fails, say)."""
    try:
        yield
    finally:
        sock.close()


async def serve(args: argparse.Namespace, console: Console) -> int:
    from ..engine import open_engine
    from ..server import open_server

    config: ServeConfig = args.serve_config
    configure_logging(args.log_level)
    sock = listen(config.server.host, config.server.port, console)
    if sock is None:
        return 2
    preload = list(config.models) if config.preload is None else list(config.preload)
    names = ", ".join(preload) or "none"
    later = [m for m in config.models if m not in preload]
    on_demand = f"; on first request: {', '.join(later)}" if later else ""
    console.note(f"erllama serve: loading models ({names}{on_demand}) ...")
    async with (
        _closing(sock),
        open_engine(config.engine_config()) as engine,
        open_server(engine, config, sock) as server,
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


def serve_ray(args: argparse.Namespace, console: Console) -> int:
    """``erllama serve --ray``: the same routes from ``--replicas`` engine replicas on Ray
    Serve, until Ctrl-C or SIGTERM. Starts a local Ray instance, or joins the cluster
    ``RAY_ADDRESS`` names (then only this application is removed at the end). Blocking:
    Ray's own calls are synchronous, and the serving happens in Ray's processes."""
    try:
        import ray
        from ray import serve

        from ..ray import ScaleOut, build_application
        from ..ray.app import wait_until_serving
        from ..server.run import bind_socket
    except ImportError as exc:
        console.note(f"erllama serve --ray needs the ray extra ({RAY_EXTRA_HINT}): {exc}")
        return 2
    config: ServeConfig = args.serve_config
    server = config.server
    scale = ScaleOut(replicas=args.replicas or 2, router=args.router or "erllama")
    port = server.port
    if port == 0:  # Serve needs a number: take one that is free now
        with bind_socket(server.host, 0) as sock:
            port = sock.getsockname()[1]
    address = os.environ.get("RAY_ADDRESS")
    joined = bool(address)
    where = f"joining the Ray cluster at {address}" if joined else "starting a local Ray instance"
    console.note(f"erllama serve: {where} ...")
    if joined:
        ray.init(configure_logging=False)
    else:
        ray.init(include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    try:
        status = serve.status()
        # HTTP options are the cluster's, fixed when its Serve started.
        proxy_running = bool(status.proxies or status.applications)
        serve.start(http_options={"host": server.host, "port": port})
        replicas = f"{scale.replicas} replica{'s' if scale.replicas != 1 else ''}"
        console.note(f"erllama serve: deploying {replicas} ({scale.router} router) ...")
        serve.run(
            build_application(config, scale), name=RAY_APP_NAME, route_prefix="/", blocking=False
        )
        wait_until_serving(RAY_APP_NAME)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        host = f"[{server.host}]" if ":" in server.host else server.host
        auth = "API key required" if server.api_keys else "no API key"
        where = (
            "serving on the cluster's Serve HTTP proxy (its own host and port), route /"
            if proxy_running
            else f"listening on http://{host}:{port}"
        )
        console.note(
            f"erllama serve: {where} ({scale.replicas} replicas on Ray Serve; {auth}); Ctrl-C stops"
        )
        while not stop.wait(0.5):
            pass
        console.note("erllama serve: stopping")
    finally:
        # Bounded: a signal sent to the whole process group (``kill -TERM -PGID``, a
        # supervisor's stop) also ends the local Ray's own processes, and Serve's shutdown
        # would then wait for them forever.
        remove = (lambda: serve.delete(RAY_APP_NAME)) if joined else serve.shutdown
        worker = threading.Thread(target=remove, name="serve-shutdown", daemon=True)
        worker.start()
        worker.join(RAY_SHUTDOWN_TIMEOUT_S)
        if worker.is_alive():
            console.note("erllama serve: Ray Serve did not stop in time; leaving it")
        ray.shutdown()
    return 0
