"""The hand-off from native threads to the loop (erllama._loop): order, no loss, shutdown."""

from __future__ import annotations

import threading

import anyio
import pytest

from erllama._loop import LoopHandoff

pytestmark = pytest.mark.anyio


async def test_calls_from_several_threads_all_run_in_each_threads_order() -> None:
    handoff = LoopHandoff()
    seen: list[tuple[int, int]] = []
    done = anyio.Event()
    per_thread, threads = 2000, 4

    def note(t: int, i: int) -> None:
        seen.append((t, i))
        if len(seen) == per_thread * threads:
            done.set()

    def produce(t: int) -> None:
        for i in range(per_thread):
            assert handoff.post(note, t, i)

    async with anyio.create_task_group() as tg:
        await tg.start(handoff.pump)
        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        with anyio.fail_after(30):
            await done.wait()
        for w in workers:
            w.join()
        handoff.close()
    assert len(seen) == per_thread * threads
    for t in range(threads):
        assert [i for tt, i in seen if tt == t] == list(range(per_thread))


async def test_close_runs_what_was_posted_then_refuses_more() -> None:
    handoff = LoopHandoff()
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        await tg.start(handoff.pump)
        assert handoff.post_all([(ran.append, ("a",)), (ran.append, ("b",))])
        handoff.close()
    assert ran == ["a", "b"]
    assert handoff.post(ran.append, "late") is False
    assert ran == ["a", "b"]


async def test_the_pump_keeps_delivering_through_a_cancelled_scope() -> None:
    """A shutdown cancels the model's tasks; what its thread sends while it ends must still
    arrive (the pump is shielded until ``close``)."""
    handoff = LoopHandoff()
    got = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(handoff.pump)
        tg.cancel_scope.cancel()
        threading.Thread(target=handoff.post, args=(got.set,)).start()
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            await got.wait()
        handoff.close()
    assert got.is_set()


async def test_a_raising_call_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handoff = LoopHandoff()
    ran: list[int] = []

    def boom() -> None:
        raise ValueError("boom")

    async with anyio.create_task_group() as tg:
        await tg.start(handoff.pump)
        handoff.post(boom)
        handoff.post(ran.append, 1)
        handoff.close()
    assert ran == [1]
    assert any("failed on the event loop" in r.getMessage() for r in caplog.records)
