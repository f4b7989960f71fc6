"""How many sequences ``erllama serve`` should decode together by default (``--parallel``):
1, 2 and 4 concurrent greedy streams on the bundled SmolLM2, ``n_seq_max`` = N, cache off,
2 threads; the aggregate decode rate once every stream has its first token, best of two
runs. Prints one line per N.

    PYTHONPATH=src python bench/parallel_streams.py
"""

from __future__ import annotations

import time

import anyio

import erllama
from erllama.bundled import bundled_model_path

QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a steam engine works, step by step, in detail.",
    "Describe a walk through a busy market in a coastal town.",
    "Tell the history of a small mountain village over two centuries.",
]
TOKENS = 64


async def run(n: int) -> float:
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(config) as engine:
        model = erllama.ModelConfig(
            model_path=bundled_model_path(), n_ctx=1024, n_seq_max=n, n_threads=2,
            keep_live_kv=False,
        )  # fmt: skip
        mid = await engine.load_model("m", model)
        prompts = [
            await engine.apply_chat_template(mid, [{"role": "user", "content": q}])
            for q in QUESTIONS[:n]
        ]
        first = [0.0] * n
        stamps: list[list[float]] = [[] for _ in range(n)]

        async def one(i: int) -> None:
            stream = await engine.infer(mid, prompts[i], max_tokens=TOKENS, temperature=0.0)
            async with stream:
                async for event in stream:
                    if isinstance(event, erllama.Token):
                        now = time.perf_counter()
                        stamps[i].append(now)
                        first[i] = first[i] or now

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        start = max(first)
        after = [t for s in stamps for t in s if t > start]
        return len(after) / (max(after) - start)


async def main() -> None:
    rates: dict[int, list[float]] = {}
    for _ in range(2):
        for n in (1, 2, 4):
            rates.setdefault(n, []).append(await run(n))
    for n, runs in rates.items():
        each = ", ".join(f"{r:.1f}" for r in runs)
        print(f"{n} streams: {max(runs):.1f} tok/s aggregate (runs: {each})")


if __name__ == "__main__":
    anyio.run(main)
