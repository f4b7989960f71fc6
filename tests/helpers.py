"""Small helpers shared by tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import threading
from typing import Any

import anyio

import erllama
from erllama.backends.stub import StubControl, _word
from erllama.plugins import BackendRegistry


def stub_config(**options: object) -> erllama.ModelConfig:
    """A stub model config; keyword arguments become stub options, except the ModelConfig
    fields n_seq_max, max_queue, n_ctx, prefill_chunk and keep_live_kv."""
    fields = {
        k: options.pop(k)
        for k in ("n_seq_max", "max_queue", "n_ctx", "prefill_chunk", "keep_live_kv")
        if k in options
    }
    fields.setdefault("n_ctx", 512)
    return erllama.ModelConfig(backend="stub", options=options, **fields)  # type: ignore[arg-type]


def metered() -> StubControl:
    """A stub control whose steps each need a permit (``release(control, n)``)."""
    return StubControl(permits=threading.Semaphore(0))


def release(control: StubControl, n: int = 1) -> None:
    assert control.permits is not None
    control.permits.release(n)


async def wait_for(predicate: object, within: float = 5.0) -> None:
    """Poll a condition every millisecond. For facts set by worker threads, which cannot
    set an anyio.Event, polling is the honest way to wait."""
    with anyio.fail_after(within):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await anyio.sleep(0.001)


def unblock_stubs(engine: erllama.Engine) -> None:
    """Release every stub model's gates and permits, so that a test that failed while
    holding a model mid-step still lets the engine close (native steps are never
    abandoned, so a step blocked forever would hang the teardown)."""
    for worker in list(engine._models.values()):
        loaded = worker.loaded
        control = getattr(getattr(loaded, "handle", None), "control", None)
        if not isinstance(control, StubControl):
            continue
        if control.permits is not None:
            control.permits.release(1_000_000)
        for gate in (control.gate, control.forward_gate):
            if gate is not None:
                gate.set()


def words(n: int, start: int = 0) -> str:
    """``n`` stub vocabulary words: exactly one token each."""
    return " ".join(_word(start + i) for i in range(n))


async def cold_run(
    registry: BackendRegistry, prompt: str | list[int], **kw: Any
) -> erllama.Completion:
    """What the stub answers with no cache at all (the reference every warm run must equal)."""
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("m", stub_config())
        return await engine.complete(mid, prompt, **kw)
