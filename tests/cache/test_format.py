"""The row file format: round trips, and every kind of damage is refused as CorruptRow."""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama._version import __version__
from erllama.cache.format import (
    HEADER_SIZE,
    HIT_COUNT_OFFSET,
    REASON_CODES,
    CorruptRow,
    encode_row,
    open_row,
    read_meta,
    read_row,
)
from erllama.cache.key import Namespace, encode_tokens
from erllama.cache.port import SAVE_REASONS

from ..helpers import examples

NS = Namespace(b"\x11" * 32, 3, b"\x22" * 32)
OTHER_NS = Namespace(b"\x11" * 32, 4, b"\x22" * 32)

# Header offsets of the length fields (see the layout in format.py).
META_LEN_OFFSET = 20
PAYLOAD_LEN_OFFSET = 24


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    # Module-scoped (not tmp_path) so hypothesis examples can share it.
    with tempfile.TemporaryDirectory(prefix="erkv-format-") as d:
        yield Path(d)


def row_bytes(tokens: list[int], payload: bytes, reason: str = "finish", **kw: object) -> bytes:
    return encode_row(NS, tokens, reason, payload, **kw) + payload  # type: ignore[arg-type]


def write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def meta_of(path: Path, key: bytes | None) -> None:
    fd, st_ = open_row(path)
    try:
        read_meta(fd, st_.st_size, key)
    finally:
        os.close(fd)


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    tokens = [1, 2, 3, 70000]
    payload = os.urandom(1000)
    path = write(tmp_path / "r", row_bytes(tokens, payload, "cold", created_ns=123, hits=7))
    meta, got = read_row(path, NS.key(tokens))
    assert got == payload
    assert meta.key == NS.key(tokens)
    assert meta.tokens == tuple(tokens)
    assert meta.token_bytes == encode_tokens(tokens)
    assert meta.n_tokens == 4
    assert meta.reason == "cold"
    assert (meta.fingerprint, meta.quant, meta.layout_hash) == (
        NS.fingerprint,
        NS.quant,
        NS.layout_hash,
    )
    assert meta.namespace() == NS
    assert meta.ns_id == NS.id
    assert meta.library_version == __version__
    assert (meta.created_ns, meta.hits) == (123, 7)
    assert meta.payload_len == 1000
    assert meta.file_size == path.stat().st_size


def test_empty_payload_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "r", row_bytes([5], b""))
    meta, got = read_row(path, NS.key([5]))
    assert got == b""
    assert meta.payload_len == 0


def test_large_payload_round_trips(tmp_path: Path) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 13)  # several read chunks and an odd tail
    path = write(tmp_path / "r", row_bytes([1, 2], payload))
    _, got = read_row(path, NS.key([1, 2]))
    assert got == payload


def test_many_tokens_round_trip(tmp_path: Path) -> None:
    tokens = list(range(40_000))
    path = write(tmp_path / "r", row_bytes(tokens, b"x"))
    meta, _ = read_row(path, NS.key(tokens))
    assert meta.tokens == tuple(tokens)


def test_tokens_may_be_given_as_bytes() -> None:
    assert encode_row(NS, encode_tokens([1, 2]), "cold", b"", created_ns=1) == encode_row(
        NS, [1, 2], "cold", b"", created_ns=1
    )


def test_reason_codes_cover_every_save_reason() -> None:
    assert set(REASON_CODES) == set(SAVE_REASONS)
    assert sorted(REASON_CODES.values()) == [1, 2, 3, 4, 5]


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=200),
    reason=st.sampled_from(SAVE_REASONS),
    payload=st.binary(max_size=4096),
    hits=st.integers(0, 2**32 - 1),
)
def test_any_row_round_trips(
    scratch: Path, tokens: list[int], reason: str, payload: bytes, hits: int
) -> None:
    path = write(scratch / "rt", row_bytes(tokens, payload, reason, hits=hits))
    meta, got = read_row(path, NS.key(tokens))
    assert (meta.tokens, meta.reason, meta.hits, bytes(got)) == (
        tuple(tokens),
        reason,
        hits,
        payload,
    )


def test_meta_parse_returns_the_recomputed_key_when_none_is_expected(tmp_path: Path) -> None:
    path = write(tmp_path / "r", row_bytes([9, 9], b"abc"))
    fd, st_ = open_row(path)
    try:
        assert read_meta(fd, st_.st_size, None).key == NS.key([9, 9])
    finally:
        os.close(fd)


def test_unknown_tlv_tags_are_ignored(tmp_path: Path) -> None:
    data = row_bytes([1], b"p", extra_tlvs=[(999, b"future"), (40000, b"")])
    meta, got = read_row(write(tmp_path / "r", data), NS.key([1]))
    assert (meta.tokens, bytes(got)) == ((1,), b"p")


def test_hit_count_rewritten_in_place_keeps_the_row_valid(tmp_path: Path) -> None:
    path = write(tmp_path / "r", row_bytes([1, 2, 3], b"payload"))
    with open(path, "r+b") as f:
        f.seek(HIT_COUNT_OFFSET)
        f.write(struct.pack("<I", 4242))
    meta, _ = read_row(path, NS.key([1, 2, 3]))
    assert meta.hits == 4242


# -- damage -----------------------------------------------------------------------------------


def test_every_single_bit_flip_outside_the_hit_count_is_caught(tmp_path: Path) -> None:
    # Exhaustive over a small row: header, every TLV and the payload.
    good = row_bytes([1, 2, 3], b"0123456789abcdef")
    key = NS.key([1, 2, 3])
    path = tmp_path / "r"
    hits = range(HIT_COUNT_OFFSET * 8, (HIT_COUNT_OFFSET + 4) * 8)
    for bit in range(len(good) * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        write(path, bad)
        if bit in hits:
            read_row(path, key)
            continue
        with pytest.raises(CorruptRow):
            read_row(path, key)


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50),
    payload=st.binary(max_size=2048),
    data=st.data(),
)
def test_random_bit_flip_is_caught(
    scratch: Path, tokens: list[int], payload: bytes, data: st.DataObject
) -> None:
    good = row_bytes(tokens, payload)
    bit = data.draw(
        st.integers(0, len(good) * 8 - 1).filter(
            lambda b: not HIT_COUNT_OFFSET <= b // 8 < HIT_COUNT_OFFSET + 4
        )
    )
    bad = bytearray(good)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptRow):
        read_row(write(scratch / "flip", bad), NS.key(tokens))


def test_truncation_at_every_length_is_caught(tmp_path: Path) -> None:
    good = row_bytes([7, 8, 9], b"some payload bytes")
    path = tmp_path / "r"
    for n in range(len(good)):
        write(path, good[:n])
        with pytest.raises(CorruptRow):
            read_row(path, NS.key([7, 8, 9]))
        if n >= HEADER_SIZE:
            with pytest.raises(CorruptRow):
                meta_of(path, NS.key([7, 8, 9]))


@given(extra=st.binary(min_size=1, max_size=100))
@settings(max_examples=examples(1 / 3))
def test_trailing_bytes_are_caught(scratch: Path, extra: bytes) -> None:
    path = write(scratch / "tail", row_bytes([1], b"abc") + extra)
    with pytest.raises(CorruptRow):
        read_row(path, NS.key([1]))
    with pytest.raises(CorruptRow):
        meta_of(path, NS.key([1]))


def reseal(data: bytes | bytearray) -> bytearray:
    """Recompute every checksum, as a buggy (or hostile) writer would: a lie in a length field
    must then be caught by the length checks themselves, not by a checksum."""
    out = bytearray(data)
    (meta_len,) = struct.unpack_from("<I", out, META_LEN_OFFSET)
    meta = out[HEADER_SIZE : HEADER_SIZE + meta_len]
    payload = out[HEADER_SIZE + meta_len :]
    struct.pack_into(
        "<QQ", out, 40, xxhash.xxh3_64_intdigest(meta), xxhash.xxh3_64_intdigest(payload)
    )
    h = xxhash.xxh3_64(bytes(out[:HIT_COUNT_OFFSET]))
    h.update(bytes(out[HIT_COUNT_OFFSET + 4 : HEADER_SIZE - 8]))
    struct.pack_into("<Q", out, HEADER_SIZE - 8, h.intdigest())
    return out


def _patched_header(data: bytes, offset: int, fmt: str, value: int) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return reseal(out)


def with_meta(tlvs: list[tuple[int, bytes]], payload: bytes = b"") -> bytearray:
    """A row whose metadata is exactly ``tlvs`` (checksums valid)."""
    meta = b"".join(struct.pack("<HI", tag, len(v)) + v for tag, v in tlvs)
    header = bytearray(encode_row(NS, [], "cold", payload)[:HEADER_SIZE])
    struct.pack_into("<I", header, META_LEN_OFFSET, len(meta))
    n_tokens = sum(len(v) for tag, v in tlvs if tag == 3) // 4
    struct.pack_into("<I", header, 12, n_tokens)
    return reseal(header + meta + payload)


def test_reseal_alone_keeps_a_row_valid(tmp_path: Path) -> None:
    # Guards the helpers below: damage they build is refused for the damage, not the seal.
    path = write(tmp_path / "r", reseal(row_bytes([1, 2], b"abc")))
    read_row(path, NS.key([1, 2]))
    ok = with_meta([(1, NS.fingerprint), (2, NS.layout_hash), (3, encode_tokens([4]))], b"zz")
    assert read_row(write(tmp_path / "m", ok), NS.key([4]))[0].tokens == (4,)


@pytest.mark.parametrize(
    ("tlvs", "why"),
    [
        ([(2, b"\x22" * 32), (3, b"")], "required TLV 1"),
        ([(1, b"\x11" * 32), (3, b"")], "required TLV 2"),
        ([(1, b"\x11" * 32), (2, b"\x22" * 32)], "required TLV 3"),
        ([(1, b"\x11" * 32), (1, b"\x11" * 32), (2, b"\x22" * 32), (3, b"")], "repeated"),
        ([(1, b"\x11" * 31), (2, b"\x22" * 32), (3, b"")], "32 bytes"),
        ([(1, b"\x11" * 32), (2, b"\x22" * 32), (3, b"abc")], "token"),
        ([(1, b"\x11" * 32), (2, b"\x22" * 32), (3, b""), (4, b"\xff")], "UTF-8"),
    ],
    ids=["no-fp", "no-layout", "no-tokens", "dup", "short-fp", "odd-tokens", "bad-utf8"],
)
def test_bad_metadata_is_corrupt(tmp_path: Path, tlvs: list[tuple[int, bytes]], why: str) -> None:
    path = write(tmp_path / "r", with_meta(tlvs))
    with pytest.raises(CorruptRow, match=why):
        meta_of(path, None)


def test_truncated_tlv_header_is_corrupt(tmp_path: Path) -> None:
    good = with_meta([(1, NS.fingerprint), (2, NS.layout_hash), (3, b"")])
    meta_len = struct.unpack_from("<I", good, META_LEN_OFFSET)[0]
    bad = bytearray(good[: HEADER_SIZE + meta_len] + b"\x07\x00\x00")
    struct.pack_into("<I", bad, META_LEN_OFFSET, meta_len + 3)
    with pytest.raises(CorruptRow, match="truncated TLV"):
        meta_of(write(tmp_path / "r", reseal(bad)), None)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "why"),
    [
        (META_LEN_OFFSET, "<I", 2**32 - 1, "file size"),
        (PAYLOAD_LEN_OFFSET, "<Q", 2**63, "file size"),
        (12, "<I", 2**32 - 1, "token count"),
    ],
    ids=["meta_len", "payload_len", "token_count"],
)
def test_lying_header_length_is_refused_without_allocating(
    tmp_path: Path, offset: int, fmt: str, value: int, why: str
) -> None:
    path = write(tmp_path / "r", _patched_header(row_bytes([1, 2], b"abc"), offset, fmt, value))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptRow, match=why):
            read_row(path, None)
        with pytest.raises(CorruptRow, match=why):
            meta_of(path, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_lying_tlv_length_is_refused_without_allocating(tmp_path: Path) -> None:
    good = row_bytes([1, 2], b"abc")
    # First TLV starts right after the header: tag u16, then its length u32.
    bad = bytearray(good)
    struct.pack_into("<I", bad, HEADER_SIZE + 2, 2**32 - 1)
    path = write(tmp_path / "r", reseal(bad))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptRow, match="overruns"):
            read_row(path, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_wrong_expected_key_is_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path / "r", row_bytes([1, 2], b"abc"))
    with pytest.raises(CorruptRow, match="key"):
        read_row(path, NS.key([1, 3]))
    with pytest.raises(CorruptRow, match="key"):
        read_row(path, OTHER_NS.key([1, 2]))
    with pytest.raises(CorruptRow, match="key"):
        meta_of(path, NS.key([1]))


def test_symlink_is_corrupt_and_not_followed(tmp_path: Path) -> None:
    target = write(tmp_path / "target", row_bytes([1], b"abc"))
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(CorruptRow):
        read_row(link, NS.key([1]))


def test_fifo_is_corrupt_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CorruptRow):
        read_row(fifo, None)


def test_missing_file_is_not_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_row(tmp_path / "absent", None)


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="reason"):
        encode_row(NS, [1], "nope", b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="u32"):
        encode_row(NS, [2**32], "cold", b"")
    with pytest.raises(ValueError, match="tag"):
        encode_row(NS, [1], "cold", b"", extra_tlvs=[(3, b"")])
