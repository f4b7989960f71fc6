"""Run one Python block from the documentation (tests/test_docs.py starts this in a subprocess).

    python run_doc_block.py BLOCK.py SCRATCH_DIR [--with-engine]

A block marked ``<!-- runnable -->`` is a whole program and runs as ``__main__``. A block
marked ``<!-- runnable with engine, mid -->`` continues the getting-started example: it runs
with top-level ``await``, with ``erllama``, ``anyio``, an open ``engine`` and ``mid`` (the
bundled SmolLM2, loaded as in that example) in scope.

Engines keep the documented defaults except one: the ``/dev/shm`` tier lives in
SCRATCH_DIR, because a test must not write to the machine's /dev/shm.
"""

from __future__ import annotations

import ast
import inspect
import runpy
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs

import erllama
import erllama.engine
from erllama.bundled import bundled_model_path

_open_engine = erllama.engine.open_engine


def _scratch_open_engine(scratch: Path) -> Any:
    def open_engine(config: Any = None, **kw: Any) -> Any:
        if config is None:
            config = erllama.EngineConfig()
        elif not isinstance(config, erllama.EngineConfig):
            config = erllama.load_config(config)
        shm = config.cache.ram_file_dir
        if shm is not None and Path(shm).parts[:3] == ("/", "dev", "shm"):
            cache = attrs.evolve(config.cache, ram_file_dir=scratch / "shm")
            config = attrs.evolve(config, cache=cache)
        return _open_engine(config, **kw)

    return open_engine


async def _with_engine(path: Path) -> None:
    code = compile(path.read_text(), str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    async with erllama.open_engine() as engine:
        model = erllama.ModelConfig(model_path=bundled_model_path())
        mid = await engine.load_model("smol", model)
        scope = {"erllama": erllama, "anyio": anyio, "engine": engine, "mid": mid}
        result = eval(code, scope)
        if inspect.iscoroutine(result):
            await result


def main() -> None:
    block, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    erllama.open_engine = erllama.engine.open_engine = _scratch_open_engine(scratch)
    if "--with-engine" in sys.argv[3:]:
        anyio.run(_with_engine, block)
    else:
        runpy.run_path(str(block), run_name="__main__")


if __name__ == "__main__":
    main()
