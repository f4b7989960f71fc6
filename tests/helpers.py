"""Small helpers shared by tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import contextlib
import errno
import inspect
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import settings

import erllama
from erllama.backends import stub
from erllama.backends.stub import StubControl, _word
from erllama.cache.tiers import FileTier
from erllama.plugins import BackendRegistry


def examples(share: float) -> int:
    """Hypothesis examples for a test whose examples cost more (``share`` > 1) or less than
    most: that share of the loaded profile's ``max_examples`` (tests/conftest.py)."""
    return max(1, round(settings.default.max_examples * share))


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


def gated() -> StubControl:
    """A stub control whose every step waits until the test sets ``control.gate``."""
    return StubControl(gate=threading.Event())


def release(control: StubControl, n: int = 1) -> None:
    """Hand a metered control ``n`` more permits (``control.open()`` lets it run free)."""
    assert control.permits is not None
    control.permits.release(n)


async def wait_for(
    predicate: Callable[[], object],
    within: float = 10.0,
    what: str = "a condition",
    every: float = 0.001,
) -> None:
    """Poll a fact every ``every`` seconds, for at most ``within`` seconds. For facts set by
    worker threads (which cannot set an anyio.Event) or other processes, polling the fact
    itself is the honest way to wait; ``what`` names it when the wait times out. An async
    predicate (one that asks a server, say) is awaited each time."""
    try:
        with anyio.fail_after(within):
            while True:
                holds = predicate()
                if inspect.isawaitable(holds):
                    holds = await holds
                if holds:
                    return
                await anyio.sleep(every)
    except TimeoutError:
        raise TimeoutError(f"waited {within} s for {what}") from None


async def settled(engine: erllama.Engine, model_id: str) -> None:
    """Return once ``model_id``'s thread has been round its loop since this was called.

    The thread takes the calls queued for it, then plans and runs a step, then takes calls
    again: this passes it two calls, the second sent when the first has answered, so a
    step it was about to run when this was called has run by the time this returns. A test
    that checks a step did *not* happen checks after this. (The calls end a session that
    no one holds, which changes nothing.) Not for a model held mid-step: it would wait.
    """
    for _ in range(2):
        await engine.end_session(model_id, "tests.helpers.settled")


def unblock_stubs() -> None:
    """Open every live stub model's gates and permits, so that a test that failed while
    holding a model mid-step still lets its engine close (native steps are never
    abandoned, so a step blocked forever would hang the teardown)."""
    for control in stub.live_controls():
        control.open()


def words(n: int, start: int = 0) -> str:
    """``n`` stub vocabulary words: exactly one token each."""
    return " ".join(_word(start + i) for i in range(n))


async def cold_run(
    registry: BackendRegistry | None,
    prompt: str | list[int],
    stub_options: Mapping[str, object] | None = None,
    *,
    model: erllama.ModelConfig | None = None,
    **kw: Any,
) -> erllama.Completion:
    """What a fresh engine with the cache off answers (the reference every warm run must
    equal): a stub loaded with ``stub_options`` (``eog_every`` changes what it says), or
    ``model`` with live-KV reuse off (a real model: pass ``registry=None`` for the default
    registry). Keyword arguments go to ``complete``."""
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    config = stub_config(**stub_options or {}) if model is None else model
    async with erllama.open_engine(cfg, backends=registry) as engine:
        mid = await engine.load_model("cold", attrs.evolve(config, keep_live_kv=False))
        return await engine.complete(mid, prompt, **kw)


@attrs.define(eq=False)
class SmallDisk:
    """A directory on a 1 MiB tmpfs that ``fill()`` makes full (every write then fails with
    ENOSPC) and ``free()`` empties again.

    Where mount is not permitted, ``real`` is False and a full disk is imitated instead:
    ``fill()`` patches ``FileTier.write_tmp`` to fail with ENOSPC, ``free()`` undoes it.
    """

    #: The directory to give as ``disk_dir``: it exists (0700).
    path: Path
    real: bool
    _monkeypatch: pytest.MonkeyPatch

    @classmethod
    @contextlib.contextmanager
    def mounted(cls, at: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
        at.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(at)],
                capture_output=True,
                check=False,
            )
            real = done.returncode == 0
        except OSError:  # no mount(8) at all
            real = False
        try:
            (at / "rows").mkdir(mode=0o700)  # before filling: a full tmpfs may refuse mkdir
            yield cls(at / "rows", real, monkeypatch)
        finally:
            # Lazily if still busy (a failed test may leave an fd open): never leave a mount.
            if real and subprocess.run(["umount", str(at)], check=False).returncode:
                subprocess.run(["umount", "-l", str(at)], check=False)

    _write_tmp: Any = None

    def fill(self) -> None:
        if not self.real:
            self._write_tmp = FileTier.write_tmp
            self._monkeypatch.setattr(FileTier, "write_tmp", _no_space)
            return
        chunk = b"\0" * 4096
        with open(self.path.parent / "ballast", "ab", buffering=0) as f:
            while True:
                try:
                    f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return

    def free(self) -> None:
        if not self.real:
            if self._write_tmp is not None:
                self._monkeypatch.setattr(FileTier, "write_tmp", self._write_tmp)
            return
        (self.path.parent / "ballast").unlink(missing_ok=True)


def _no_space(self: FileTier, *a: object) -> Path:
    raise OSError(errno.ENOSPC, "No space left on device")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
