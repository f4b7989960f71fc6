"""Small records kept beside the cache rows: what must survive a restart with them.

The rows make a replayed conversation warm only while its prompt re-tokenizes to the
tokens the model produced. What makes that true (each reply's exact token ids, the reply
a tool-call id came from) is kept here, in every file tier's directory, so it survives a
restart and is shared by the processes (Ray replicas) that share the directory.

One record is one file, ``records/<kind>/<xxh3_128 of kind and key>.rec``::

    offset size  field
    0      4     magic b"ERRC"
    4      2     format version (1)
    6      2     reserved (0)
    8      4     key length
    12     4     value length
    16     8     xxh3_64 of key and value
    24     ...   key, then value

Publishing is the rows' protocol in small: write a temp in the same directory (O_EXCL),
then rename it over the final name (a record is replaced by its newer version, so rename,
not link): a reader sees a whole record or the one before. Unlike a row, a record is not
fsynced: a crash may lose it or leave it torn, and reading checks the magic, the lengths,
the checksum and the key (a name is a hash: two keys may share one), so a torn record is
removed and reads as absent. A lost record costs one prefill; an fsync per reply cost
every request (measured: it made a load/unload churn test three to five times slower).
A crash leaves at worst a temp, which a later trim sweeps.

Bounded: past ``max_records`` files of a kind, the least recently written go first.
Methods do blocking file I/O: call them from a worker thread. They never raise: a damaged
or vanished file reads as absent, and a put to a full or unwritable directory is dropped
(the record is only an optimisation: without it a later turn prefills more).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import xxhash

__all__ = ["RecordStore"]

_MAGIC: Final = b"ERRC"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<4sHHIIQ")
_SUFFIX: Final = ".rec"
_TMP_SUFFIX: Final = ".tmp"
#: Temps older than this are a dead writer's: a live one finishes in milliseconds.
_STALE_TMP_S: Final = 600.0
#: Puts between two checks of the directory's size.
_TRIM_EVERY: Final = 32


def _name(kind: str, key: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(kind.encode() + b"\0" + key) + _SUFFIX


def encode(key: bytes, value: bytes) -> bytes:
    digest = xxhash.xxh3_64_intdigest(key + value)
    return _HEADER.pack(_MAGIC, _VERSION, 0, len(key), len(value), digest) + key + value


def decode(raw: bytes, key: bytes) -> bytes | None:
    """The value of a record of ``key``; None when ``raw`` is not one (torn, damaged, of
    another version, or of another key under the same name)."""
    if len(raw) < _HEADER.size:
        return None
    magic, version, _, n_key, n_value, digest = _HEADER.unpack_from(raw)
    body = raw[_HEADER.size :]
    if magic != _MAGIC or version != _VERSION or len(body) != n_key + n_value:
        return None
    if xxhash.xxh3_64_intdigest(body) != digest or body[:n_key] != key:
        return None
    return body[n_key:]


class RecordStore:
    """Records of one ``kind`` in each of ``directories`` (the file tiers'): a put writes
    every directory, a get reads the first that has the record.

    Each ``<dir>/records/<kind>`` is made (0700) and opened once, at construction, with
    O_NOFOLLOW, and every later operation is relative to that fd, as the tiers' are: a
    directory swapped for a symlink afterwards redirects nothing. One that cannot be made or
    opened is left out."""

    def __init__(self, directories: Sequence[Path], kind: str, max_records: int) -> None:
        self.kind = kind
        self.max_records = max_records
        self._fds: list[int] = []
        for d in directories:
            fd = _open_dir(Path(d) / "records" / kind)
            if fd is not None:
                self._fds.append(fd)
        self._puts = 0
        weakref.finalize(self, _close_all, list(self._fds))

    def put(self, key: bytes, value: bytes) -> None:
        record = encode(key, value)
        name = _name(self.kind, key)
        for dfd in self._fds:
            try:
                _write(dfd, name, record)
            except OSError:
                # A full or read-only directory: the rows' tier reports its own trouble;
                # here the record is only lost, which costs a cold prefill later.
                continue
        self._puts += 1
        if self._puts % _TRIM_EVERY == 0:
            self.trim()

    def get(self, key: bytes) -> bytes | None:
        name = _name(self.kind, key)
        for dfd in self._fds:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                with os.fdopen(fd, "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            value = decode(raw, key)
            if value is not None:
                return value
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
        return None

    def trim(self) -> None:
        """Past ``max_records`` records in a directory, remove the least recently written;
        remove temps a dead writer left."""
        for dfd in self._fds:
            try:
                with os.scandir(dfd) as it:
                    entries = list(it)
            except OSError:
                continue
            records: list[tuple[int, str]] = []
            for e in entries:
                try:
                    mtime = e.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                if e.name.endswith(_SUFFIX):
                    records.append((mtime, e.name))
                elif e.name.endswith(_TMP_SUFFIX) and _age(mtime / 1e9) > _STALE_TMP_S:
                    with contextlib.suppress(OSError):
                        os.unlink(e.name, dir_fd=dfd)
            records.sort()
            for _, name in records[: max(0, len(records) - self.max_records)]:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)


def _open_dir(path: Path) -> int | None:
    try:
        # Every folder made here is 0700, parents included (``Path.mkdir(parents=True)``
        # would give the parents the umask's mode): records hold replies' text.
        missing = []
        p = path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            return None  # another user's folder: never read or write records there
    except OSError:
        os.close(fd)
        return None
    return fd


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _write(dfd: int, name: str, record: bytes) -> None:
    tmp = f"{name}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
    try:
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _age(mtime: float) -> float:
    return time.time() - mtime
