"""Model identity for the cache: the SHA-256 of the weights file, computed once per file version."""

from __future__ import annotations

import os
import threading
from hashlib import sha256
from pathlib import Path

__all__ = ["file_sha256"]

_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()
_CHUNK = 8 * 1024 * 1024


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of ``path``, remembered per (real path, size, mtime) for this process, so
    loading a multi-GB model a second time does not hash it again; a rewritten file (new
    size or mtime) is hashed afresh."""
    real = os.path.realpath(path)
    st = os.stat(real)
    memo_key = (real, st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    h = sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with Path(real).open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    with _lock:
        _memo[memo_key] = digest
    return digest


def clear_memo() -> None:
    """Forget remembered digests (tests)."""
    with _lock:
        _memo.clear()
