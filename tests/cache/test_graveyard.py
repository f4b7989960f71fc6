"""The record of removed rows: nearest lookups, bounds, and keys that come back."""

from __future__ import annotations

from erllama.cache.graveyard import Graveyard
from erllama.cache.key import encode_tokens

NS = b"n" * 65


def key(i: int) -> bytes:
    return bytes([i]) * 32


def test_the_removed_row_sharing_most_is_found_with_its_reason() -> None:
    g = Graveyard()
    g.record(key(1), NS, encode_tokens([1, 2, 3]), "ram", "evicted")
    g.record(key(2), NS, encode_tokens([1, 2, 9, 9]), "disk", "corrupt")
    found = g.nearest(NS, [1, 2, 9, 5])
    assert found is not None
    common, grave = found
    assert (common, grave.key, grave.tier, grave.why) == (3, key(2), "disk", "corrupt")
    assert g.nearest(b"o" * 65, [1, 2, 9, 5]) is None  # another namespace's removals
    assert g.nearest(NS, [7]) is None


def test_it_forgets_oldest_first_past_its_bounds() -> None:
    g = Graveyard(entries=2, token_bytes=1000)
    for i in range(3):
        g.record(key(i), NS, encode_tokens([i, 50]), "ram", "gc")
    assert len(g) == 2
    assert g.nearest(NS, [0, 50]) is None
    assert g.nearest(NS, [2, 50]) is not None
    small = Graveyard(token_bytes=16)
    small.record(key(1), NS, encode_tokens([1, 2, 3]), "ram", "gc")
    small.record(key(2), NS, encode_tokens([4, 5]), "ram", "gc")  # 20 bytes > 16
    assert len(small) == 1 and small.nearest(NS, [1, 2]) is None


def test_a_key_indexed_again_is_not_gone() -> None:
    g = Graveyard()
    g.record(key(1), NS, encode_tokens([1, 2, 3]), "ram", "evicted")
    g.discard(key(1))
    assert len(g) == 0 and g.nearest(NS, [1, 2, 3]) is None
