"""The process's compute thread (erllama.backends.llama_compute): every callable handed to
it runs on one thread, one at a time, in arrival order; results and exceptions come back to
the caller."""

from __future__ import annotations

import threading
import time

import pytest

from erllama.backends.llama_compute import SharedCompute


def test_every_call_runs_on_one_thread_whatever_thread_hands_it_over() -> None:
    compute = SharedCompute("test-compute")
    seen: list[int] = []

    def caller() -> None:
        for _ in range(50):
            seen.append(compute.run(threading.get_ident))

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert len(seen) == 200 and len(set(seen)) == 1
    assert seen[0] not in {t.ident for t in callers} | {threading.get_ident()}


def test_calls_never_overlap() -> None:
    compute = SharedCompute("test-compute")
    inside = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.002)
        with lock:
            inside -= 1

    callers = [
        threading.Thread(target=lambda: [compute.run(work) for _ in range(10)]) for _ in range(3)
    ]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert most == 1


def test_a_result_and_an_exception_come_back_to_the_caller() -> None:
    compute = SharedCompute("test-compute")
    assert compute.run(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 // 0)
    assert compute.run(lambda: "still serving") == "still serving"


def test_a_call_from_the_compute_thread_runs_in_place() -> None:
    compute = SharedCompute("test-compute")
    assert compute.run(lambda: compute.run(lambda: 7)) == 7
