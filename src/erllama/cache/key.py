"""Cache keys: SHA-256 over a model namespace and an exact token list.

``key = SHA-256(fingerprint[32] || quant[1] || kv_layout_hash[32] || tokens as u32 LE)``

The namespace part (fingerprint, quantisation byte, KV-layout hash) is hashed once per
namespace; a key for a token list then costs one ``copy()`` of that state plus the tokens.
"""

from __future__ import annotations

import hashlib
import json
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "KEY_BYTES",
    "Namespace",
    "QUANT_CODES",
    "effective_fingerprint",
    "common_prefix_tokens",
    "encode_tokens",
    "decode_tokens",
    "kv_layout_hash",
    "parse_key",
    "quant_byte",
    "salted",
]

KEY_BYTES = 32

#: Stable cache-internal quantisation codes (not GGUF type ids); unknown labels map to 255.
QUANT_CODES: Mapping[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 4, "q5_1": 5, "q8_0": 6,
    "q4_k_m": 7, "q4_k_s": 8, "q5_k_m": 9, "q5_k_s": 10, "q6_k": 11, "q8_k": 12,
    "q2_k": 13, "q3_k_s": 14, "q3_k_m": 15, "q3_k_l": 16, "iq2_xxs": 17, "iq2_xs": 18,
    "iq2_s": 19, "iq2_m": 20, "iq3_xxs": 21, "iq3_xs": 22, "iq3_s": 23, "iq3_m": 24,
    "iq1_s": 25, "iq1_m": 26, "iq4_nl": 27, "iq4_xs": 28, "bf16": 29,
}  # fmt: skip
UNKNOWN_QUANT = 255

_U32 = array("I")
assert _U32.itemsize == 4
_LITTLE = struct.pack("=I", 1) == struct.pack("<I", 1)


def quant_byte(label: str) -> int:
    """The quantisation code for ``label`` (case-insensitive); 255 when unknown."""
    return QUANT_CODES.get(label.lower(), UNKNOWN_QUANT)


def encode_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as u32 little-endian (raises ValueError for ids outside u32)."""
    try:
        arr = array("I", tokens)
    except OverflowError as exc:
        raise ValueError(f"token id outside u32: {exc}") from exc
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def decode_tokens(data: bytes | memoryview) -> tuple[int, ...]:
    if len(data) % 4:
        raise ValueError("token bytes are not a multiple of 4")
    arr = array("I")
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return tuple(arr)


def common_prefix_tokens(a: bytes, b: bytes) -> int:
    """How many leading tokens two u32 LE token byte strings share (one big-int XOR, not a
    Python loop: prompts run to tens of thousands of tokens)."""
    n = min(len(a), len(b))
    diff = int.from_bytes(a[:n], "little") ^ int.from_bytes(b[:n], "little")
    if not diff:
        return n // 4
    return ((diff & -diff).bit_length() - 1) // 8 // 4


def kv_layout_hash(layout: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of every parameter that shapes the KV layout."""
    canon = json.dumps(dict(layout), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).digest()


def effective_fingerprint(base: bytes, adapters: Iterable[tuple[bytes, float]]) -> bytes:
    """Fold LoRA adapters (sha256, scale) into a model fingerprint.

    Sorted, so attach order does not matter; scales are quantised (round(scale * 2**32)) so
    float formatting never splits the cache. No adapters (or all at scale 0, which computes
    exactly the base model) gives the base fingerprint back.
    """
    active = sorted((sha, round(scale * 2**32)) for sha, scale in adapters if scale != 0)
    if not active:
        return base
    h = hashlib.sha256(base)
    for sha, q in active:
        h.update(sha)
        h.update(struct.pack("<q", q))
    return h.digest()


def salted(fingerprint: bytes, salt: str | None) -> bytes:
    """A request's fingerprint with its cache salt folded in: requests with different
    salts never share a row or a sequence's live KV (a server gives each API key its own
    salt, so one key cannot learn another's prompts from cache hits). No salt gives the
    fingerprint back."""
    if salt is None:
        return fingerprint
    return hashlib.sha256(b"erllama-cache-salt\0" + fingerprint + salt.encode()).digest()


def parse_key(value: str | bytes) -> bytes:
    """A key from its 64-digit hex form or its 32 raw bytes (ValueError otherwise)."""
    if isinstance(value, bytes) and len(value) == KEY_BYTES:
        return value
    if isinstance(value, str) and len(value) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ValueError("a key is 64 hex digits or 32 bytes")


@attrs.frozen
class Namespace:
    """Everything in a key except the tokens; rows from different namespaces never collide."""

    fingerprint: bytes
    quant: int
    layout_hash: bytes
    _prefix: Any = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if len(self.fingerprint) != 32 or len(self.layout_hash) != 32:
            raise ValueError("fingerprint and layout hash must be 32 bytes")
        if not 0 <= self.quant <= 255:
            raise ValueError("quant code must fit a byte")
        h = hashlib.sha256(self.fingerprint)
        h.update(bytes([self.quant]))
        h.update(self.layout_hash)
        object.__setattr__(self, "_prefix", h)

    @property
    def id(self) -> bytes:
        """A compact identity of the namespace (for index partitioning)."""
        return self.fingerprint + bytes([self.quant]) + self.layout_hash

    def key(self, tokens: Sequence[int]) -> bytes:
        return self.key_of_bytes(encode_tokens(tokens))

    def key_of_bytes(self, token_bytes: bytes | memoryview) -> bytes:
        h = self._prefix.copy()
        h.update(token_bytes)
        digest: bytes = h.digest()
        return digest
