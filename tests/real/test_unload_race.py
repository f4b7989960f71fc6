"""Unloading a model never frees it under a call that uses its native handle (SmolLM2).

Before the gate, ``engine.unload_model`` racing a ``tokenize`` of a long text on a worker
thread freed the llama.cpp model under it: the process died with SIGSEGV. Here every call
that reaches the handle races an unload, at several points of its life (before it starts,
while it runs off the model thread, as it ends). Every call must end with its result or a
typed error, and the process must live; at least one round per call must have had the
unload wait for the call (proof that the race window was really hit).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import erllama

pytestmark = pytest.mark.anyio

#: Checkpoints between starting the call and starting the unload. Negative: the unload
#: starts first and the call that many checkpoints later (it is refused); 0: both start
#: together; the larger ones land while the call runs on a worker thread.
DELAYS = (-1, 0, 2, 16)

LONG_TEXT = "lorem ipsum dolor sit amet " * 4000  # ~20k tokens: tens of ms to tokenize

Call = Callable[[erllama.Engine, str], Awaitable[Any]]


async def _tokenize(engine: erllama.Engine, mid: str) -> Any:
    return await engine.tokenize(mid, LONG_TEXT)


async def _detokenize(engine: erllama.Engine, mid: str) -> Any:
    return await engine.detokenize(mid, [1000 + i % 40_000 for i in range(60_000)])


async def _template(engine: erllama.Engine, mid: str) -> Any:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
        for i in range(400)
    ]
    return await engine.apply_chat_template(mid, messages)


async def _sampler(engine: erllama.Engine, mid: str) -> Any:
    # A grammar makes sampler construction real work off the model thread.
    alternatives = " | ".join(f'"option {i}"' for i in range(300))
    stream = await engine.infer(
        mid, [1, 2, 3], max_tokens=2, temperature=0.5, seed=1, grammar=f"root ::= {alternatives}"
    )
    return await stream.collect()


async def _infer_text(engine: erllama.Engine, mid: str) -> Any:
    stream = await engine.infer(mid, "lorem ipsum " * 300, max_tokens=2)
    return await stream.collect()


async def _embed(engine: erllama.Engine, mid: str) -> Any:
    return await engine.embed(mid, "lorem ipsum dolor " * 100)


async def _routing(engine: erllama.Engine, mid: str) -> Any:
    return await engine.longest_cached_prefix(mid, LONG_TEXT)


CALLS: dict[str, Call] = {
    "tokenize": _tokenize,
    "detokenize": _detokenize,
    "chat_template": _template,
    "sampler": _sampler,
    "infer_text": _infer_text,
    "embed": _embed,
    "routing": _routing,
}


@attrs.define
class Round:
    outcome: str = ""
    call_end: float = 0.0
    unload_start: float = 0.0
    unload_end: float = 0.0


async def race(
    engine: erllama.Engine, config: erllama.ModelConfig, call: Call, delay: int
) -> Round:
    mid = await engine.load_model("racer", config)
    r = Round()

    async def run_call() -> None:
        for _ in range(-delay):
            await anyio.lowlevel.checkpoint()
        try:
            await call(engine, mid)
            r.outcome = "result"
        except erllama.ModelNotFound as exc:  # ModelUnloading is one
            r.outcome = type(exc).__name__
        r.call_end = time.monotonic()

    async def run_unload() -> None:
        for _ in range(max(delay, 0)):
            await anyio.lowlevel.checkpoint()
        r.unload_start = time.monotonic()
        await engine.unload_model(mid)
        r.unload_end = time.monotonic()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            if delay < 0:
                tg.start_soon(run_unload)
                tg.start_soon(run_call)
            else:
                tg.start_soon(run_call)
                tg.start_soon(run_unload)
    return r


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_unload_racing_a_native_call_never_frees_the_model_under_it(
    name: str, smol_path: Path, no_cache: erllama.EngineConfig
) -> None:
    config = erllama.ModelConfig(
        model_path=smol_path, n_ctx=2048, n_batch=512, n_threads=2, embeddings=name == "embed"
    )
    async with erllama.open_engine(no_cache) as engine:
        rounds = [await race(engine, config, CALLS[name], d) for d in DELAYS]
        # The engine still serves: load again and run a request to its end.
        mid = await engine.load_model("after", config)
        done = await engine.complete(mid, [1, 2, 3, 4], max_tokens=3)
        assert done.finish_reason == "length"
    for r in rounds:
        assert r.outcome in ("result", "ModelUnloading", "ModelNotFound"), r
        assert r.unload_end > 0, r
    # The window was hit: some unload began while the call ran and waited for its result.
    waited = [r for r in rounds if r.outcome == "result" and r.unload_start < r.call_end]
    assert waited, f"no round raced the call while it ran: {rounds}"
    # And a call that arrives once the unload has begun is refused, typed.
    assert any(r.outcome != "result" for r in rounds), rounds


async def test_a_call_after_the_unload_began_is_refused_with_model_unloading(
    smol_path: Path, no_cache: erllama.EngineConfig
) -> None:
    config = erllama.ModelConfig(model_path=smol_path, n_ctx=2048, n_threads=2)
    async with erllama.open_engine(no_cache) as engine:
        mid = await engine.load_model("m", config)
        outcomes: list[str] = []

        async def late_tokenize() -> None:
            try:
                await engine.tokenize(mid, "hello")
                outcomes.append("result")
            except erllama.ModelUnloading:
                outcomes.append("unloading")

        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.tokenize, mid, LONG_TEXT * 5)  # holds the unload
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(engine.unload_model, mid)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(late_tokenize)
        assert outcomes == ["unloading"]
        with pytest.raises(erllama.ModelNotFound):
            await engine.tokenize(mid, "hello")
