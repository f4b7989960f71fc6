"""A user's program: streams from the stub until the test sends SIGINT (Ctrl-C).

    python interrupt_mid_stream.py asyncio|trio

Prints "streaming" once tokens flow, so the test knows when to interrupt.
"""

from __future__ import annotations

import sys

import anyio

import erllama
from erllama.backends import stub


async def main() -> None:
    registry = erllama.make_backend_registry({"stub": stub}, autoload=False)
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(config, backends=registry) as engine:
        model = erllama.ModelConfig(backend="stub", n_ctx=100_000, options={"step_delay_s": 0.002})
        mid = await engine.load_model(model)
        async with await engine.infer(mid, "go on", max_tokens=90_000) as stream:
            async for n, _event in _numbered(stream):
                if n == 5:
                    print("streaming", flush=True)


async def _numbered(stream: erllama.InferStream):  # type: ignore[no-untyped-def]
    n = 0
    async for event in stream:
        n += 1
        yield n, event


anyio.run(main, backend=sys.argv[1])
