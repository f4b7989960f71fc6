"""Key derivation: deterministic, sensitive to every component, token-exact."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama.cache.key import (
    Namespace,
    decode_tokens,
    effective_fingerprint,
    encode_tokens,
    kv_layout_hash,
    parse_key,
    quant_byte,
)

b32 = st.binary(min_size=32, max_size=32)
tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=200)


@given(b32, st.integers(0, 255), b32, tokens_st)
def test_key_is_sha256_of_the_documented_layout(
    fp: bytes, q: int, lh: bytes, toks: list[int]
) -> None:
    expected = hashlib.sha256(fp + bytes([q]) + lh + struct.pack(f"<{len(toks)}I", *toks)).digest()
    ns = Namespace(fp, q, lh)
    assert ns.key(toks) == expected
    assert ns.key(toks) == ns.key_of_bytes(encode_tokens(toks))


@given(b32, st.integers(0, 255), b32, tokens_st, st.data())
def test_any_changed_component_changes_the_key(
    fp: bytes, q: int, lh: bytes, toks: list[int], data: st.DataObject
) -> None:
    key = Namespace(fp, q, lh).key(toks)
    other_fp = data.draw(b32.filter(lambda b: b != fp))
    other_q = data.draw(st.integers(0, 255).filter(lambda x: x != q))
    other_lh = data.draw(b32.filter(lambda b: b != lh))
    other_toks = data.draw(tokens_st.filter(lambda t: t != toks))
    assert Namespace(other_fp, q, lh).key(toks) != key
    assert Namespace(fp, other_q, lh).key(toks) != key
    assert Namespace(fp, q, other_lh).key(toks) != key
    assert Namespace(fp, q, lh).key(other_toks) != key


@given(tokens_st)
def test_tokens_round_trip(toks: list[int]) -> None:
    assert decode_tokens(encode_tokens(toks)) == tuple(toks)


def test_tokens_outside_u32_are_refused() -> None:
    with pytest.raises(ValueError, match="outside u32"):
        encode_tokens([2**32])
    with pytest.raises(ValueError, match="multiple of 4"):
        decode_tokens(b"\x00\x01\x02")


@given(
    b32,
    st.lists(
        st.tuples(b32, st.floats(-4, 4, allow_nan=False)), max_size=5, unique_by=lambda t: t[0]
    ),
    st.randoms(),
)
def test_effective_fingerprint_ignores_adapter_order(
    base: bytes, adapters: list[tuple[bytes, float]], rnd
) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(adapters)
    rnd.shuffle(shuffled)
    assert effective_fingerprint(base, adapters) == effective_fingerprint(base, shuffled)


def test_effective_fingerprint_splits_by_adapter_and_scale() -> None:
    base, a, b = bytes(32), b"a" * 32, b"b" * 32
    assert effective_fingerprint(base, []) == base
    assert effective_fingerprint(base, [(a, 0.0)]) == base  # scale 0 computes the base model
    fa = effective_fingerprint(base, [(a, 1.0)])
    assert fa != base
    assert effective_fingerprint(base, [(b, 1.0)]) != fa
    assert effective_fingerprint(base, [(a, 0.5)]) != fa
    # Float formatting never splits the cache: 0.1 + 0.2 and 0.3 quantise alike.
    assert effective_fingerprint(base, [(a, 0.1 + 0.2)]) == effective_fingerprint(base, [(a, 0.3)])


def test_layout_hash_is_canonical() -> None:
    assert kv_layout_hash({"a": 1, "b": "x"}) == kv_layout_hash({"b": "x", "a": 1})
    assert kv_layout_hash({"n_ctx": 512}) != kv_layout_hash({"n_ctx": 1024})


def test_quant_codes_and_parse_key() -> None:
    assert quant_byte("Q4_1") == 3 and quant_byte("f16") == 1 and quant_byte("mystery") == 255
    key = bytes(range(32))
    assert parse_key(key.hex()) == key == parse_key(key)
    for bad in ("zz" * 32, "ab", b"short"):
        with pytest.raises(ValueError, match="key is 64 hex digits"):
            parse_key(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        Namespace(b"x", 0, bytes(32))
