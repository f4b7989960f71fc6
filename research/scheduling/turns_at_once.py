"""4 conversations send their turns at once, 4 rounds: each request's TTFT (in-process, the
llama.cpp backend's defaults on the CPU: padded chunks). Round 0 is cold (one shared system
prompt, prefilled once in flight); rounds 1-3 are later turns. Run from the repository root:

    .venv/bin/python research/scheduling/turns_at_once.py

Used to measure "one prompt finishes per step" (a chunk that ends its prompt waits when
another prompt already finishes in the step): on 2026-12-07, later-turn medians 0.71-0.75 s
with the rule against 0.78-1.23 s without, the last TTFT of a round 1.17-1.22 s against
1.23-1.38 s. Not kept: over HTTP (bench http_servers) the median did not improve (1.42 s
against 1.32 s the run before), and it let a later request start feeding before an earlier
one that waited (tests/stress/test_load.py checks that admitted requests start in order)."""

import statistics
import time

import anyio

import erllama
from erllama.bundled import bundled_model_path

SYSTEM = (
    "You are the assistant of a harbour office. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros, children travel free, bicycles cost three euros. "
) * 12


async def main() -> None:
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None))
    async with erllama.open_engine(cfg) as engine:
        mid = await engine.load_model(
            "m",
            erllama.ModelConfig(
                model_path=bundled_model_path(), n_ctx=4096, n_batch=512, n_threads=2, n_seq_max=4
            ),
        )
        hist = [
            [{"role": "user", "content": f"Question {i}: when does ferry {i} leave?"}]
            for i in range(4)
        ]

        async def turn(i, out):
            t0 = time.perf_counter()
            p = await engine.apply_chat_template(mid, hist[i], SYSTEM)
            s = await engine.infer(mid, p, max_tokens=24)
            ttft = None
            text = []
            async for ev in s:
                if ttft is None and getattr(ev, "token_id", None) is not None:
                    ttft = time.perf_counter() - t0
                if getattr(ev, "text", None):
                    text.append(ev.text)
            out[i] = (ttft, "".join(text))

        for rnd in range(4):
            out = {}
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(turn, i, out)
            ttfts = [out[i][0] for i in range(4)]
            print(
                rnd,
                [round(t, 3) for t in ttfts],
                "median",
                round(statistics.median(ttfts), 3),
                flush=True,
            )
            for i in range(4):
                hist[i] += [
                    {"role": "assistant", "content": out[i][1]},
                    {"role": "user", "content": f"And after that, round {rnd}?"},
                ]


anyio.run(main)
