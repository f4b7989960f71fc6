"""The versioned binary format of one cache row (a ``.kvc`` file). No pickle anywhere.

Layout, all little-endian::

    offset size  field
    0      4     magic b"ERKV"
    4      2     format version (1)
    6      2     header length (64)
    8      1     save reason: cold 1, continued 2, finish 3, evict 4, shutdown 5
    9      1     quant code (erllama.cache.key.QUANT_CODES, or 255 for unknown)
    10     2     flags (written 0, ignored)
    12     4     token count
    16     4     hit count                 <- HIT_COUNT_OFFSET, rewritten in place by pwrite
    20     4     metadata length
    24     8     payload length
    32     8     created (unix ns)
    40     8     xxh3_64 of the metadata
    48     8     xxh3_64 of the payload
    56     8     xxh3_64 of bytes 0..16 and 20..56 (everything but the hit count and itself)
    64     ...   metadata: TLV records (tag u16, length u32, value)
    ...    ...   payload (the backend's state blob) to end of file

TLV tags: 1 fingerprint (32 B), 2 KV-layout hash (32 B), 3 tokens (u32 LE each), 4 library
version (UTF-8). 1-3 are required; unknown tags are skipped (forward compatible); a known tag
twice is corrupt. The key is not stored: it is recomputed from the TLVs and compared.

The metadata has its own checksum (rather than one over metadata and payload) so that the
start-up "meta parse" verifies everything it indexes without reading the payload.

Checksum choice, by measurement (bench/bench_checksum.py on this 2-core AMD EPYC VM; a restore
runs at ~4.3 GB/s and verifying may cost at most a quarter of it, so >17 GB/s is needed):

    GB/s               46 MiB buffer   1 MiB buffer (in cache)
    xxhash.xxh3_64     9.7-11.4        33-35
    xxhash.xxh3_128    10.4-11.4       34
    xxhash.xxh64       7.1-7.4         8.7
    crc32c (pkg)       11.3-11.9       23
    google-crc32c      9.2-9.7         22.6
    zlib.crc32         2.4-2.5         2.5
    hashlib.blake2b    0.6-0.8         0.8

Over 46 MiB every fast hash is capped by this VM's memory bandwidth (~10.5 GB/s), so none
reaches 17 GB/s hashing a buffer after reading it. Hence the payload is hashed while it is
read, 256 KiB at a time, each chunk right after it lands in cache, where xxh3_64 runs at
~34 GB/s: that added ~1.1 ms to a 46 MiB read, against ~4.5 ms for hashing afterwards
(read_row measured no slower than a bare chunked read of the same file). xxh3_64 wins and is
already a dependency; the crc32c packages were measured, not adopted.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
import xxhash

from .._version import __version__
from .key import KEY_BYTES, QUANT_CODES, UNKNOWN_QUANT, Namespace, decode_tokens, encode_tokens
from .port import SaveReason

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "parse_row",
    "HIT_COUNT_OFFSET",
    "MAGIC",
    "MAX_META_BYTES",
    "REASON_CODES",
    "CorruptRow",
    "RowMeta",
    "encode_row",
    "open_row",
    "read_meta",
    "read_row",
    "read_row_fd",
]

MAGIC: Final = b"ERKV"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 64
#: Offset of the u32 hit count; no checksum covers these 4 bytes, so it may be pwritten.
HIT_COUNT_OFFSET: Final = 16
#: Metadata larger than this is refused before it is read (16M tokens; a guard, not a limit
#: anyone should meet).
MAX_META_BYTES: Final = 64 << 20

REASON_CODES: Final[dict[SaveReason, int]] = {
    "cold": 1,
    "continued": 2,
    "finish": 3,
    "evict": 4,
    "shutdown": 5,
}
_REASONS_BY_CODE: Final[dict[int, SaveReason]] = {v: k for k, v in REASON_CODES.items()}
_VALID_QUANTS: Final = frozenset(QUANT_CODES.values()) | {UNKNOWN_QUANT}

TAG_FINGERPRINT: Final = 1
TAG_LAYOUT_HASH: Final = 2
TAG_TOKENS: Final = 3
TAG_LIBRARY_VERSION: Final = 4
_KNOWN_TAGS: Final = frozenset({TAG_FINGERPRINT, TAG_LAYOUT_HASH, TAG_TOKENS, TAG_LIBRARY_VERSION})

_HEADER = struct.Struct("<4sHHBBHIIIQQQQQ")
_TLV = struct.Struct("<HI")
_U32 = struct.Struct("<I")
assert _HEADER.size == HEADER_SIZE
assert struct.calcsize("<4sHHBBHI") == HIT_COUNT_OFFSET
_CHECKSUMMED_HEAD = slice(0, HIT_COUNT_OFFSET)
_CHECKSUMMED_TAIL = slice(HIT_COUNT_OFFSET + 4, HEADER_SIZE - 8)
#: Payload read/hash step: small enough that each chunk is hashed while still in cache.
_CHUNK = 256 << 10
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class CorruptRow(ValueError):
    """A row file failed a check (``reason`` says which); it must be removed, never served.

    Raised for every content problem and for paths that are not regular files (a symlink,
    refused through O_NOFOLLOW, included). An absent file raises FileNotFoundError instead, and
    other OS errors (EACCES, EIO) propagate unchanged.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"corrupt cache row: {reason}")


@attrs.frozen(kw_only=True)
class RowMeta:
    """Everything about a row except its payload, as read from (or written to) its file.

    Tokens are kept as their u32 LE bytes (4 B each, vs ~36 B per token in a tuple of ints)
    because an index over thousands of long rows holds them all; ``tokens`` decodes on demand.
    """

    key: bytes
    reason: SaveReason
    quant: int
    fingerprint: bytes
    layout_hash: bytes
    token_bytes: bytes = attrs.field(repr=lambda b: f"<{len(b) // 4} tokens>")
    library_version: str
    created_ns: int
    #: Hit count as last written; the only unchecksummed field, so treat it as a hint.
    hits: int
    payload_len: int
    file_size: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_bytes) // 4

    @property
    def tokens(self) -> tuple[int, ...]:
        """The row's exact token list (decoded from ``token_bytes`` on each call)."""
        return decode_tokens(self.token_bytes)

    @property
    def ns_id(self) -> bytes:
        """Equal to ``Namespace.id`` of the row's namespace (for index partitioning)."""
        return self.fingerprint + bytes([self.quant]) + self.layout_hash

    def namespace(self) -> Namespace:
        return Namespace(self.fingerprint, self.quant, self.layout_hash)


@attrs.frozen
class _Header:
    reason: SaveReason
    quant: int
    n_tokens: int
    hits: int
    meta_len: int
    payload_len: int
    created_ns: int
    meta_sum: int
    payload_sum: int


def _tlv(tag: int, value: bytes) -> bytes:
    return _TLV.pack(tag, len(value)) + value


def _header_sum(header: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64(header[_CHECKSUMMED_HEAD])
    h.update(header[_CHECKSUMMED_TAIL])
    return h.intdigest()


def _payload_sum(payload: bytes | bytearray | memoryview) -> int:
    # Chunked so one call never holds the GIL for a whole multi-MB payload.
    h = xxhash.xxh3_64()
    view = memoryview(payload).cast("B")
    for i in range(0, len(view), _CHUNK * 4):
        h.update(view[i : i + _CHUNK * 4])
    return h.intdigest()


def encode_row(
    ns: Namespace,
    tokens: Sequence[int] | bytes,
    reason: SaveReason,
    payload: bytes | bytearray | memoryview,
    *,
    created_ns: int | None = None,
    hits: int = 0,
    library_version: str = __version__,
    extra_tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """The header and metadata ("prefix") of a row whose payload is ``payload``.

    The file is ``prefix + payload``; write it with ``os.writev(fd, [prefix, payload])`` so a
    multi-MB payload is never copied into a concatenation. ``payload`` is read (to checksum
    it), not kept. ``tokens`` may be the ids or their ``encode_tokens`` bytes. ``extra_tlvs``
    adds records with tags readers do not know (they skip them). Raises ValueError for an
    unknown reason, a bad token list, or a reused known tag.
    """
    code = REASON_CODES.get(reason)
    if code is None:
        raise ValueError(f"unknown save reason {reason!r}")
    # bytearray/memoryview are byte strings here, never lists of ids.
    if isinstance(tokens, bytes | bytearray | memoryview):
        token_bytes = bytes(tokens)
    else:
        token_bytes = encode_tokens(tokens)
    if len(token_bytes) % 4:
        raise ValueError("token bytes are not a multiple of 4")
    parts = [
        _tlv(TAG_FINGERPRINT, ns.fingerprint),
        _tlv(TAG_LAYOUT_HASH, ns.layout_hash),
        _tlv(TAG_TOKENS, token_bytes),
        _tlv(TAG_LIBRARY_VERSION, library_version.encode()),
    ]
    for tag, value in extra_tlvs:
        if tag in _KNOWN_TAGS or not 0 <= tag <= 0xFFFF:
            raise ValueError(f"extra TLV tag {tag} is reserved or out of range")
        parts.append(_tlv(tag, bytes(value)))
    meta = b"".join(parts)
    n_tokens = len(token_bytes) // 4
    if len(meta) > min(MAX_META_BYTES, _U32_MAX) or n_tokens > _U32_MAX:
        raise ValueError("row metadata too large")
    header = bytearray(
        _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            code,
            ns.quant,
            0,
            n_tokens,
            min(max(hits, 0), _U32_MAX),
            len(meta),
            memoryview(payload).nbytes,
            time.time_ns() if created_ns is None else created_ns,
            xxhash.xxh3_64_intdigest(meta),
            _payload_sum(payload),
            0,
        )
    )
    header[HEADER_SIZE - 8 :] = struct.pack("<Q", _header_sum(header))
    return bytes(header) + meta


def _parse_header(raw: bytes, file_size: int) -> _Header:
    if len(raw) < HEADER_SIZE:
        raise CorruptRow("shorter than the header")
    (
        magic,
        version,
        header_len,
        code,
        quant,
        _flags,
        n_tokens,
        hits,
        meta_len,
        payload_len,
        created_ns,
        meta_sum,
        payload_sum,
        header_sum,
    ) = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptRow("bad magic")
    if version != FORMAT_VERSION or header_len != HEADER_SIZE:
        raise CorruptRow(f"unsupported version {version} (header length {header_len})")
    if header_sum != _header_sum(raw[:HEADER_SIZE]):
        raise CorruptRow("header checksum mismatch")
    reason = _REASONS_BY_CODE.get(code)
    if reason is None:
        raise CorruptRow(f"unknown save reason code {code}")
    if quant not in _VALID_QUANTS:
        raise CorruptRow(f"unknown quant code {quant}")
    # Exact: a truncated file and one with trailing bytes are both refused, and no length
    # field can claim more than the file really holds.
    if HEADER_SIZE + meta_len + payload_len != file_size:
        raise CorruptRow(
            f"lengths ({HEADER_SIZE}+{meta_len}+{payload_len}) != file size {file_size}"
        )
    if meta_len > MAX_META_BYTES:
        raise CorruptRow(f"metadata length {meta_len} over the {MAX_META_BYTES} guard")
    if n_tokens * 4 > meta_len:
        raise CorruptRow("token count larger than the metadata")
    return _Header(
        reason, quant, n_tokens, hits, meta_len, payload_len, created_ns, meta_sum, payload_sum
    )


def _parse_meta(
    header: _Header, meta: bytes, expected_key: bytes | None, file_size: int
) -> RowMeta:
    if len(meta) != header.meta_len:
        raise CorruptRow("metadata truncated")
    if xxhash.xxh3_64_intdigest(meta) != header.meta_sum:
        raise CorruptRow("metadata checksum mismatch")
    found: dict[int, bytes] = {}
    pos = 0
    end = len(meta)
    while pos < end:
        if end - pos < _TLV.size:
            raise CorruptRow("truncated TLV header")
        tag, length = _TLV.unpack_from(meta, pos)
        pos += _TLV.size
        if length > end - pos:  # checked before the value is sliced out
            raise CorruptRow(f"TLV {tag} length {length} overruns the metadata")
        if tag in _KNOWN_TAGS:
            if tag in found:
                raise CorruptRow(f"TLV {tag} repeated")
            found[tag] = meta[pos : pos + length]
        pos += length
    try:
        fingerprint = found[TAG_FINGERPRINT]
        layout_hash = found[TAG_LAYOUT_HASH]
        token_bytes = found[TAG_TOKENS]
    except KeyError as exc:
        raise CorruptRow(f"required TLV {exc.args[0]} missing") from None
    if len(fingerprint) != 32 or len(layout_hash) != 32:
        raise CorruptRow("fingerprint or layout hash is not 32 bytes")
    if len(token_bytes) != 4 * header.n_tokens:
        raise CorruptRow("token count does not match the tokens TLV")
    try:
        library_version = found.get(TAG_LIBRARY_VERSION, b"").decode()
    except UnicodeDecodeError:
        raise CorruptRow("library version is not UTF-8") from None
    key = Namespace(fingerprint, header.quant, layout_hash).key_of_bytes(token_bytes)
    if expected_key is not None and key != expected_key:
        raise CorruptRow("key recomputed from the metadata differs from the expected key")
    return RowMeta(
        key=key,
        reason=header.reason,
        quant=header.quant,
        fingerprint=fingerprint,
        layout_hash=layout_hash,
        token_bytes=token_bytes,
        library_version=library_version,
        created_ns=header.created_ns,
        hits=header.hits,
        payload_len=header.payload_len,
        file_size=file_size,
    )


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    # Regular files return short reads only at EOF, i.e. the file shrank under us; one
    # retry covers a signal-interrupted read.
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            raise CorruptRow("file shrank while being read")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _check_key(expected_key: bytes | None) -> None:
    if expected_key is not None and len(expected_key) != KEY_BYTES:
        raise ValueError("expected_key must be 32 bytes")


def open_row(
    path: str | os.PathLike[str], *, dir_fd: int | None = None
) -> tuple[int, os.stat_result]:
    """Open a row file for reading; returns ``(fd, fstat)``; the caller closes ``fd``.

    O_NOFOLLOW: a symlink planted at a row's name is never followed (CorruptRow). O_NONBLOCK:
    opening a FIFO planted there must not block (it is then refused as not a regular file).
    Raises FileNotFoundError if absent, CorruptRow if not a regular file.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP on Linux (EMLINK on FreeBSD) for a symlink; ENXIO for a socket.
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):
            raise CorruptRow("not a regular file (symlink, socket ...)") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptRow("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_meta(fd: int, file_size: int, expected_key: bytes | None) -> RowMeta:
    """Meta parse (start-up scans): every check except the payload checksum.

    Checks magic, version, header checksum, reason and quant codes, that the lengths add up
    to ``file_size`` exactly, every TLV length, the metadata checksum, and the key recomputed
    from the TLVs against ``expected_key`` (None skips that comparison; ``RowMeta.key`` is then
    the recomputed key for the caller to compare). Never reads the payload; allocates only
    after the lengths were checked against ``file_size``. Raises CorruptRow.
    """
    _check_key(expected_key)
    header = _parse_header(_pread_exact(fd, min(file_size, HEADER_SIZE), 0), file_size)
    meta = _pread_exact(fd, header.meta_len, HEADER_SIZE)
    return _parse_meta(header, meta, expected_key, file_size)


def read_row_fd(
    fd: int,
    file_size: int,
    expected_key: bytes | None,
    alloc: Callable[[int], bytearray | memoryview] = bytearray,
) -> tuple[RowMeta, bytearray | memoryview]:
    """Full parse of an open row: ``read_meta`` plus the payload and its checksum.

    The payload is read into one preallocated bytearray (sized only after the header proved
    the length equals the real file size), hashing each chunk as it lands. Deliberately not
    mmap: a file truncated by someone else while mapped would SIGBUS the whole process.
    """
    _check_key(expected_key)
    header = _parse_header(_pread_exact(fd, min(file_size, HEADER_SIZE), 0), file_size)
    meta = _parse_meta(
        header, _pread_exact(fd, header.meta_len, HEADER_SIZE), expected_key, file_size
    )
    # ``alloc`` may hand out a reused buffer: a fresh multi-MB one costs page faults.
    payload = alloc(header.payload_len)
    view = memoryview(payload).cast("B")
    h = xxhash.xxh3_64()
    base = HEADER_SIZE + header.meta_len
    done = 0
    while done < len(view):
        chunk = view[done : done + _CHUNK]
        got = os.preadv(fd, [chunk], base + done)
        if got == 0:
            raise CorruptRow("file shrank while being read")
        h.update(chunk[:got])
        done += got
    if os.pread(fd, 1, base + done):
        raise CorruptRow("file grew while being read")
    if h.intdigest() != header.payload_sum:
        raise CorruptRow("payload checksum mismatch")
    return meta, payload


def read_row(
    path: str | os.PathLike[str], expected_key: bytes | None, *, dir_fd: int | None = None
) -> tuple[RowMeta, bytearray]:
    """Open and fully validate the row at ``path`` (see ``open_row`` and ``read_row_fd``).

    Raises CorruptRow for any damage or a non-regular file, FileNotFoundError if absent.
    """
    fd, st = open_row(path, dir_fd=dir_fd)
    try:
        meta, payload = read_row_fd(fd, st.st_size, expected_key)
        assert isinstance(payload, bytearray)  # the default allocator
        return meta, payload
    finally:
        os.close(fd)


def parse_row(
    data: bytes | bytearray | memoryview, expected_key: bytes | None
) -> tuple[RowMeta, memoryview]:
    """Full validation of a whole row held in memory (one sent by another engine): the same
    checks as reading it from a file, checksums and the key included. Returns the metadata
    and a view of the payload inside ``data``. Raises CorruptRow."""
    _check_key(expected_key)
    view = memoryview(data).cast("B")
    size = len(view)
    header = _parse_header(bytes(view[: min(size, HEADER_SIZE)]), size)
    meta = _parse_meta(
        header, bytes(view[HEADER_SIZE : HEADER_SIZE + header.meta_len]), expected_key, size
    )
    payload = view[HEADER_SIZE + header.meta_len :]
    if len(payload) != header.payload_len:
        raise CorruptRow("payload length does not match the header")
    if xxhash.xxh3_64_intdigest(payload) != header.payload_sum:
        raise CorruptRow("payload checksum mismatch")
    return meta, payload
