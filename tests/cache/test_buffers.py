"""The read-buffer pool reuses buffers and never hands one out twice."""

from __future__ import annotations

from erllama.cache.buffers import BufferPool


def test_a_returned_buffer_serves_the_next_read_of_up_to_its_size() -> None:
    pool = BufferPool(keep=2)
    a = pool.take(3_000_000)
    assert len(a) == 3_000_000 and not a.readonly
    backing = a.obj
    pool.give(a)
    b = pool.take(2_000_000)
    assert b.obj is backing and len(b) == 2_000_000
    c = pool.take(2_000_000)  # the pooled one is taken: a new one
    assert c.obj is not backing


def test_the_pool_keeps_only_the_largest_few_and_ignores_strangers() -> None:
    pool = BufferPool(keep=1)
    small, big = pool.take(1 << 20), pool.take(8 << 20)
    big_backing = big.obj
    pool.give(small)
    pool.give(big)
    pool.give(b"bytes are not ours")  # type: ignore[arg-type]
    pool.give(memoryview(b"read-only"))
    assert pool.take(4 << 20).obj is big_backing
    assert pool.take(4 << 20).obj is not big_backing


def test_a_buffer_still_exported_is_not_reused() -> None:
    pool = BufferPool()
    view = pool.take(1 << 20)
    held = view[:10]  # an export the reader kept
    pool.give(view)
    assert pool.take(1 << 20).obj is not held.obj
