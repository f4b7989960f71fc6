"""The command line's options and every check made on them before a model loads."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .._version import __version__
from ._demo import DEMO_TURNS

#: The one model's context size and offloaded layers when the options are left out.
N_CTX = 2048
#: Sequences ``erllama serve``'s one model decodes together (``--parallel``). Measured with
#: bench/parallel_streams.py on the project's 2-core machine (shared, so slow): SmolLM2
#: decoded 9.1 tokens/s in all with one stream, 13.6 with 2, 24.7 with 4 (docs/server.md).
PARALLEL = 4
GPU_LAYERS = 0

__all__ = ["Parser", "build_parser"]

DESCRIPTION = (
    "Run GGUF models through llama.cpp with erllama's token-exact KV cache: complete a "
    "prompt, chat, watch the cache at work (demo), inspect a model (info), serve models "
    "over HTTP (serve), or run the benchmarks (bench). Without --model, the bundled "
    "SmolLM2-135M-Instruct is used."
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, exit status 2: what is wrong and where to
    read more, rather than a usage dump that pushes the problem off the screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _number(
    low: float, high: float | None = None, *, above: bool = False
) -> Callable[[str], float]:
    """A finite float >= low (> low with ``above``), and <= high when given."""
    if high is None:
        bounds = f"{'>' if above else '>='} {low}"
    else:
        bounds = f"in {'(' if above else '['}{low}, {high}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        in_range = (value > low if above else value >= low) and (high is None or value <= high)
        if not (math.isfinite(value) and in_range):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _model_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a GGUF file")
    return path


def _cache_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path


def _config_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


def _model(sp: argparse.ArgumentParser, *, model_help: str, unset: bool = False) -> None:
    """--model, --n-ctx, --threads and --gpu-layers. With ``unset`` every default is None:
    ``serve`` must tell an option given from one left out, as they conflict with --config
    (its one model then gets :data:`N_CTX` and :data:`GPU_LAYERS`)."""
    sp.add_argument("--model", type=_model_file, default=None, metavar="PATH", help=model_help)
    sp.add_argument(
        "--n-ctx",
        type=_integer(8),
        default=None if unset else N_CTX,
        metavar="N",
        help=f"context size in tokens (default {N_CTX})",
    )
    sp.add_argument(
        "--threads",
        type=_integer(1),
        default=None,
        metavar="N",
        help="CPU threads llama.cpp uses (default: half the usable cores to decode, all to "
        "prefill)",
    )
    sp.add_argument(
        "--gpu-layers",
        type=_integer(-1),
        default=None if unset else GPU_LAYERS,
        metavar="N",
        help=f"layers to offload to the GPU, -1 for all (default {GPU_LAYERS})",
    )


def _kv_types(sp: argparse.ArgumentParser, prefix: str) -> None:
    """llama-server's -ctk/-ctv: the KV cache's element types (they shape the rows' keys)."""
    from ..config import KV_TYPES

    for flag, short, what in (("k", "-ctk", "keys"), ("v", "-ctv", "values")):
        sp.add_argument(
            f"--cache-type-{flag}",
            short,
            choices=sorted(KV_TYPES),
            default=None,
            metavar="TYPE",
            help=f"{prefix}element type of the KV cache's {what} (default f16); q8_0 for "
            "both makes llama.cpp compute every cell alike however it is batched, and "
            "the cache then reuses replies too (docs/caching.md)",
        )


def _loop(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--loop",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="event loop to run on (default %(default)s)",
    )


def _common(sp: argparse.ArgumentParser) -> None:
    _model(sp, model_help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    _loop(sp)


def _sampling(sp: argparse.ArgumentParser, max_tokens: int) -> None:
    sp.add_argument(
        "--max-tokens",
        type=_integer(1),
        default=max_tokens,
        metavar="N",
        help="most tokens to generate per reply (default %(default)s)",
    )
    sp.add_argument(
        "--temperature",
        type=_number(0),
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 picks the likeliest token every time (default 0)",
    )
    sp.add_argument(
        "--top-k",
        type=_integer(0),
        default=0,
        metavar="K",
        help="sample only from the K likeliest tokens; 0 is off (default 0)",
    )
    sp.add_argument(
        "--top-p",
        type=_number(0, 1, above=True),
        default=1.0,
        metavar="P",
        help="sample only from the likeliest tokens whose probabilities add up to P, "
        "in (0, 1]; 1 is off (default 1)",
    )
    sp.add_argument(
        "--seed",
        type=_integer(0, 2**32 - 1),
        default=0,
        metavar="N",
        help="sampler seed, for temperature > 0 (default 0)",
    )


def _serve(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve models over HTTP with OpenAI-, Anthropic- and Ollama-compatible routes",
        description="Serve models over HTTP: OpenAI-compatible /v1/chat/completions, "
        "/v1/completions, /v1/embeddings, /v1/models and /v1/responses, Anthropic-compatible "
        "/v1/messages, Ollama-compatible /api/chat, /api/generate, /api/embed, /api/tags and "
        "more, plus /health, /metrics and admin routes. Listens on 127.0.0.1 unless told "
        "otherwise. Without --config, serves one model: --model, or the bundled SmolLM2. "
        "Ctrl-C or SIGTERM stops it. See docs/server.md.",
    )
    s.add_argument(
        "--config",
        type=_config_file,
        default=None,
        metavar="FILE",
        help="TOML file naming the models, the cache, memory pressure and server settings",
    )
    _model(
        s,
        model_help="GGUF model to serve without --config (default: the bundled SmolLM2)",
        unset=True,
    )
    s.add_argument(
        "--model-id",
        default=None,
        metavar="ID",
        help="the name clients use for that model (default: smollm2, or the file's name)",
    )
    s.add_argument(
        "--parallel",
        type=_integer(1, 256),
        default=None,
        metavar="N",
        help=f"sequences that model decodes together (llama-server's -np; default "
        f"{PARALLEL}); each has --n-ctx tokens of context",
    )
    _kv_types(s, "")
    s.add_argument(
        "--default-model",
        default=None,
        metavar="ID",
        help="answer requests naming a model this server does not have (or none) with "
        "this one, as llama-server and LM Studio do (off by default)",
    )
    s.add_argument(
        "--cache-dir",
        type=_cache_dir,
        default=None,
        metavar="DIR",
        help="keep the KV cache in DIR as well as in memory, so it outlives the server",
    )
    s.add_argument(
        "--host", default=None, metavar="ADDR", help="address to listen on (default 127.0.0.1)"
    )
    s.add_argument(
        "--port",
        type=_integer(0, 65535),
        default=None,
        metavar="N",
        help="port to listen on; 0 picks a free one (default 8000)",
    )
    s.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require this key on every route but /health (repeatable; the ERLLAMA_API_KEY "
        "environment variable adds one too)",
    )
    s.add_argument(
        "--admin",
        action="store_true",
        default=None,
        help="serve the admin routes (load and unload models); off by default. With "
        "--api-key they need an --admin-key",
    )
    s.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a key for the admin routes, and only it (repeatable; turns them on; the "
        "ERLLAMA_ADMIN_KEY environment variable adds one too); user keys get 403 there",
    )
    s.add_argument(
        "--max-connections",
        type=_integer(1),
        default=None,
        metavar="N",
        help="open connections at most, 503 beyond (default: from the descriptor limit, "
        "at most 1024)",
    )
    s.add_argument(
        "--max-tokens",
        type=_integer(1),
        default=None,
        metavar="N",
        help="the most tokens one request may generate (default 4096)",
    )
    s.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="what is logged on stderr: info has a line per request and every server-side "
        "failure with its cause (default %(default)s)",
    )
    _loop(s)
    r = s.add_argument_group("scale-out on Ray Serve (needs the ray extra; see docs/scale-out.md)")
    r.add_argument(
        "--ray",
        action="store_true",
        help="serve the same routes from replicas on Ray Serve behind erllama's cache-aware "
        "router: a local Ray instance, or the cluster RAY_ADDRESS names",
    )
    r.add_argument(
        "--replicas",
        type=_integer(1),
        default=None,
        metavar="N",
        help="with --ray: engine replicas, each with cache folders of its own (default 2)",
    )
    r.add_argument(
        "--router",
        choices=("erllama", "round_robin", "prefix_affinity", "pow2"),
        default=None,
        help="with --ray: how requests are placed (default erllama; the others are Ray's "
        "own, for comparison)",
    )


def _cache(sub: Any) -> None:
    c = sub.add_parser(
        "cache",
        help="look into a KV cache directory (explain: why a prompt would miss)",
        description="Look into the KV cache a server keeps (its --cache-dir, or the [cache] "
        "of its --config file), offline. See docs/caching.md.",
    )
    ops = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    e = ops.add_parser(
        "explain",
        help="how much of PROMPT the cache would restore, and why no more",
        description="Load the model as erllama serve would (the same --config, or the same "
        "--model, --n-ctx and --parallel, so it finds the rows that server saved), and "
        "report how much of PROMPT the cache would restore, where the prompt leaves the "
        "nearest cached row, both sides of that point, and why: no row, evicted (and when), "
        "another model file, adapter set or KV layout, the prompt diverged or runs past "
        "the row, or the exactness grid. Saves nothing.",
    )
    e.add_argument(
        "--config",
        type=_config_file,
        default=None,
        metavar="FILE",
        help="the server's TOML file (its models and [cache])",
    )
    _model(
        e, model_help="the GGUF model, without --config (default: the bundled SmolLM2)", unset=True
    )
    e.add_argument(
        "--model-id",
        default=None,
        metavar="ID",
        help="with --config: which of its models (needed when it names several)",
    )
    e.add_argument(
        "--parallel",
        type=_integer(1, 256),
        default=None,
        metavar="N",
        help=f"without --config: the server's --parallel (default {PARALLEL}); it shapes the "
        "KV layout rows are keyed by",
    )
    _kv_types(e, "without --config: the server's; ")
    e.add_argument(
        "--cache-dir",
        type=_cache_dir,
        default=None,
        metavar="DIR",
        help="without --config: the server's --cache-dir",
    )
    e.add_argument(
        "--api-key",
        dest="key",
        default=None,
        metavar="KEY",
        help="explain as for a request with this API key (each key has its own rows)",
    )
    e.add_argument(
        "--cache-salt",
        default=None,
        metavar="SALT",
        help="explain as for a request with this cache_salt",
    )
    what = e.add_mutually_exclusive_group()
    what.add_argument(
        "--tokens", action="store_true", help="PROMPT is token ids separated by spaces"
    )
    what.add_argument(
        "--messages",
        default=None,
        metavar="FILE",
        help="explain these chat messages (a JSON list, or an object with 'messages'; - for "
        "stdin) rendered with the model's chat template, as a chat request would be",
    )
    e.add_argument("--json", action="store_true", help="print the explanation as JSON")
    _loop(e)
    e.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="the prompt text")
    # What serve_config reads that this command does not offer.
    e.set_defaults(ray=False, replicas=None, router=None, api_key=[], admin_key=[])


def build_parser() -> Parser:
    p = Parser(prog="erllama", description=DESCRIPTION)
    p.add_argument(
        "--version",
        action="version",
        version=f"erllama {__version__}",
        help="print the version and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "complete",
        help="stream a completion of PROMPT",
        description="Stream the model's continuation of PROMPT to stdout; timings go to stderr.",
    )
    _common(c)
    _sampling(c, 128)
    c.add_argument("prompt", type=_prompt, metavar="PROMPT", help="the text to continue")

    ch = sub.add_parser(
        "chat",
        help="chat on stdin with the model's chat template",
        description="Chat with the model, one line per message. An empty line or Ctrl-D ends "
        "the chat; Ctrl-C stops a reply, and at the prompt ends the chat. Replies go to "
        "stdout, the prompt and per-turn cache statistics to stderr.",
    )
    _common(ch)
    _sampling(ch, 256)
    ch.add_argument("--system", default=None, metavar="TEXT", help="system message")
    ch.add_argument(
        "--cache-dir",
        type=_cache_dir,
        default=None,
        metavar="DIR",
        help="keep the KV cache in DIR (created if missing), so a later chat that starts "
        "the same way is warm; without it the cache lives in memory and is gone when the "
        "chat ends",
    )

    d = sub.add_parser(
        "demo",
        help="multi-turn chat showing cold vs warm time to first token",
        description="Ask the model a few questions about a bookshop, twice per turn: on an "
        "engine with the KV cache and on one without, and compare time to first token. "
        "Installs the bundled SmolLM2 if it is missing.",
    )
    _common(d)
    d.add_argument(
        "--turns",
        type=_integer(1, len(DEMO_TURNS)),
        default=len(DEMO_TURNS),
        metavar="N",
        help=f"questions to ask, 1 to {len(DEMO_TURNS)} (default %(default)s)",
    )
    d.add_argument(
        "--max-tokens",
        type=_integer(1),
        default=48,
        metavar="N",
        help="most tokens per answer (default %(default)s)",
    )

    _serve(sub)
    _cache(sub)

    i = sub.add_parser(
        "info",
        help="load a model and print what erllama knows of it",
        description="Load the model and print its identity, size, capabilities and metadata.",
    )
    _common(i)
    # Listed for --help only: main() hands everything after "bench" to the harness's own
    # parser (bench/harness.py), which has its own --help.
    sub.add_parser(
        "bench",
        help="run the benchmark harness in bench/ (see bench/README.md; --help for options)",
        add_help=False,
    )
    return p
