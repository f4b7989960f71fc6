"""File tiers: cache rows as ``<hex key>.kvc`` files in one directory.

The same class serves the ``ram_file`` tier (a directory under /dev/shm) and the ``disk``
tier. Methods are synchronous and thread-safe (they share nothing but a directory fd); the
manager calls them from worker threads.

Safety rules, and why:

- Every operation is relative to a directory fd opened (O_NOFOLLOW) once in ``open()``, so
  swapping the directory for a symlink afterwards cannot redirect reads or writes.
- Files are opened with O_NOFOLLOW: a symlink planted at a row's name is never followed; it
  counts as a corrupt row and is unlinked (unlink removes the link, not its target).
- Publishing is crash-safe and safe between processes sharing the directory: write a temp in
  the same directory (O_EXCL), fsync it, then link(2) it to the final name. link is
  create-if-absent, so a row another process already published is never overwritten blindly
  (rename would replace it): "exists" is handled by validating that file and adopting or
  replacing it. A crash leaves at worst a stale ``*.tmp``, never a partial ``.kvc``.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import attrs

from ..errors import CacheError
from .format import (
    HEADER_SIZE,
    HIT_COUNT_OFFSET,
    CorruptRow,
    RowMeta,
    open_row,
    read_meta,
    read_row_fd,
)
from .key import KEY_BYTES

__all__ = ["FileTier", "PublishOutcome"]

PublishOutcome = Literal["published", "adopted", "replaced"]

_ROW_SUFFIX: Final = ".kvc"
_TMP_SUFFIX: Final = ".tmp"
_ROW_NAME: Final = re.compile(r"[0-9a-f]{64}\.kvc")
_U32: Final = struct.Struct("<I")
#: link attempts before publish gives up; each retry means another process changed the
#: final name between our link and our check, which needs a pathological race to repeat.
_PUBLISH_ATTEMPTS: Final = 8


def _row_name(key: bytes) -> str:
    if len(key) != KEY_BYTES:
        raise ValueError("a key is 32 bytes")
    return key.hex() + _ROW_SUFFIX


def _abspath(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(path))


def _write_all(fd: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError("writev wrote nothing")
        # Short write (signal, >2 GiB per call on Linux): drop what was written, go on.
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


@attrs.define(eq=False)
class FileTier:
    """One directory of row files. Call ``open()`` first (or use it as a context manager).

    Errors: CorruptRow (from :mod:`.format`) for a damaged row, which is removed before the
    error propagates; FileNotFoundError for an absent row; CacheError for an unusable
    directory; other OSError (ENOSPC, EIO, EACCES) propagate unchanged.
    """

    #: The tier's label in messages (``ram_file``, ``disk``).
    name: str
    directory: Path = attrs.field(converter=_abspath)
    _dir_fd: int | None = attrs.field(default=None, init=False, repr=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory (and missing parents) 0700 and open it; idempotent.

        Refuses (CacheError) a final component that is a symlink, not a directory, or owned by
        another user. Symlinks among the ancestors are accepted: systems legitimately link
        /var/run, home directories and mount points. An existing directory of ours with a
        looser mode is tightened to 0700 (KV states reveal prompts).
        """
        if self._dir_fd is not None:
            return
        path = self.directory
        self._make_dirs(path)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise CacheError("open", f"{self.name} tier: {path}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise CacheError("open", f"{self.name} tier: {path} is a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise CacheError("open", f"{self.name} tier: {path} is not a directory")
        try:
            # O_NOFOLLOW again: the path may have been swapped since the lstat.
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CacheError("open", f"{self.name} tier: {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise CacheError(
                    "open", f"{self.name} tier: {path} is owned by uid {st.st_uid}, not us"
                )
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        self._dir_fd = fd

    def _make_dirs(self, path: Path) -> None:
        # os.makedirs applies its mode only to the leaf; every directory we create is 0700.
        missing: list[Path] = []
        p = path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass  # another process made it; open() checks what it is
            except OSError as exc:
                raise CacheError("open", f"{self.name} tier: mkdir {d}: {exc.strerror}") from exc

    def close(self) -> None:
        """Close the directory fd; only when no other call is in flight. Idempotent."""
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fd(self) -> int:
        if self._dir_fd is None:
            raise CacheError("io", f"{self.name} tier is not open")
        return self._dir_fd

    # -- names -------------------------------------------------------------------------------

    def path_for(self, key: bytes) -> Path:
        """Where the row for ``key`` lives (for messages; operations go through the dir fd)."""
        return self.directory / _row_name(key)

    def _tmp_name(self, tmp: Path, key: bytes | None) -> str:
        name = tmp.name
        if (
            Path(os.path.abspath(tmp)).parent != self.directory
            or not name.endswith(_TMP_SUFFIX)
            or (key is not None and not name.startswith(_row_name(key) + "."))
        ):
            raise ValueError(f"{tmp} is not a temp of this tier for that key")
        return name

    # -- publish -----------------------------------------------------------------------------

    def write_tmp(self, key: bytes, prefix: bytes, payload: bytes | bytearray | memoryview) -> Path:
        """Write ``prefix + payload`` to a new fsynced temp beside the row's final name.

        The name carries the pid and a random part, and O_EXCL|O_NOFOLLOW means we only ever
        write a file we just created. On any failure the temp is removed before re-raising.
        """
        dfd = self._fd()
        name = f"{_row_name(key)}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dfd)
        try:
            try:
                _write_all(fd, (prefix, payload))
                # Data must be durable before the link makes it visible under its final name.
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self._unlink_quiet(name)
            raise
        return self.directory / name

    def abort_tmp(self, tmp: Path) -> None:
        """Delete a temp from ``write_tmp`` (idempotent)."""
        self._unlink_quiet(self._tmp_name(tmp, None))

    def publish(self, tmp: Path, key: bytes) -> PublishOutcome:
        """Make the temp ``tmp`` the row for ``key``; the temp is gone afterwards, always.

        ``"published"``: our file is now the row. ``"adopted"``: a valid row was already there
        (another writer won); ours is dropped. ``"replaced"``: a damaged file (or planted
        symlink) was there; it was removed and ours linked. The directory is fsynced and the
        final file fully re-validated before returning; if that fails it is removed and
        CorruptRow raised. CacheError if the name keeps changing under us (or is occupied by
        something we cannot remove, such as a directory). FileNotFoundError if the temp itself
        is gone (swept by a scan with too short an age).
        """
        dfd = self._fd()
        tmp_name = self._tmp_name(tmp, key)
        final = _row_name(key)
        outcome: PublishOutcome = "published"
        try:
            for _ in range(_PUBLISH_ATTEMPTS):
                try:
                    # link(2), not rename(2): create-if-absent, atomic, never clobbers a
                    # row another process published.
                    os.link(tmp_name, final, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    # Never ignore the existing file: it may be a torn or foreign one.
                    try:
                        self._read_checked(final, key)
                    except FileNotFoundError:
                        continue  # removed meanwhile: link again
                    except CorruptRow:
                        outcome = "replaced"  # _read_checked removed it
                        continue
                    os.fsync(dfd)
                    return "adopted"
                os.fsync(dfd)
                try:
                    self._read_checked(final, key)
                except FileNotFoundError:
                    continue  # another process removed it between link and check
                return outcome
            raise CacheError("publish", f"{self.name} tier: {final} kept changing")
        finally:
            self._unlink_quiet(tmp_name)

    # -- rows --------------------------------------------------------------------------------

    def read(
        self, key: bytes, alloc: Callable[[int], bytearray | memoryview] = bytearray
    ) -> tuple[RowMeta, bytearray | memoryview]:
        """The row's metadata and payload, fully validated (checksums, sizes, key). The
        payload lands in ``alloc(n)`` (a reusable buffer, say).

        CorruptRow: the file was damaged (or a symlink) and has been removed.
        FileNotFoundError: no such row.
        """
        return self._read_checked(_row_name(key), key, alloc)

    def read_bytes(self, key: bytes) -> bytes:
        """The whole row file as it is (for another engine, which validates it as it would
        a file of its own). FileNotFoundError if absent; no symlink is followed."""
        dfd = self._fd()
        fd = os.open(_row_name(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read()
        finally:
            os.close(fd)

    def _read_checked(
        self, name: str, key: bytes, alloc: Callable[[int], bytearray | memoryview] = bytearray
    ) -> tuple[RowMeta, bytearray | memoryview]:
        dfd = self._fd()
        try:
            fd, st = open_row(name, dir_fd=dfd)
        except CorruptRow:
            self._remove_corrupt(name, None)
            raise
        try:
            return read_row_fd(fd, st.st_size, key, alloc)
        except CorruptRow:
            self._remove_corrupt(name, st)
            raise
        finally:
            os.close(fd)

    def _remove_corrupt(self, name: str, seen: os.stat_result | None) -> bool:
        """Unlink ``name`` if it is still the file found corrupt (``seen``), or, when it could
        not be opened (``seen`` None), if it is still not a regular file. Another writer may
        have replaced it with a good row meanwhile; that one must survive."""
        dfd = self._fd()
        try:
            now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if seen is None:
            if stat.S_ISREG(now.st_mode):
                return False
        elif (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
            return False
        return self._unlink_quiet(name)

    def _unlink_quiet(self, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=self._fd())
        except FileNotFoundError:
            return False
        except (IsADirectoryError, PermissionError):
            return False  # a directory planted at the name (EISDIR/EPERM): not ours to rmtree
        return True

    def delete(self, key: bytes) -> int:
        """Remove the row; returns the bytes freed (0 if it was absent). Idempotent."""
        name = _row_name(key)
        dfd = self._fd()
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not self._unlink_quiet(name):
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def size_of(self, key: bytes) -> int | None:
        """The row file's size, or None if there is no regular file for ``key``."""
        try:
            st = os.stat(_row_name(key), dir_fd=self._fd(), follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def probe(self, key: bytes) -> tuple[RowMeta | None, bool]:
        """Look for one row this process has not indexed (published by another process).

        Returns ``(meta, False)`` for a valid row file, ``(None, writing)`` otherwise, where
        ``writing`` says a temp for ``key`` exists (someone is publishing it right now). A
        damaged file is removed.
        """
        name = _row_name(key)
        dfd = self._fd()
        try:
            fd, st = open_row(name, dir_fd=dfd)
        except FileNotFoundError:
            prefix = name + "."
            with os.scandir(dfd) as it:
                writing = any(
                    e.name.startswith(prefix) and e.name.endswith(_TMP_SUFFIX) for e in it
                )
            return None, writing
        except CorruptRow:
            self._remove_corrupt(name, None)
            return None, False
        try:
            return read_meta(fd, st.st_size, key), False
        except CorruptRow:
            self._remove_corrupt(name, st)
            return None, False
        finally:
            os.close(fd)

    def touch_hits(self, key: bytes, hits: int) -> bool:
        """Persist the hit count in the row's header in place; best effort.

        No checksum covers those 4 bytes, so the row stays valid. Returns False (and changes
        nothing) if the row is absent, not a regular file, or the write fails.
        """
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(_row_name(key), flags, dir_fd=self._fd())
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_SIZE:
                return False
            os.pwrite(fd, _U32.pack(min(max(hits, 0), 0xFFFF_FFFF)), HIT_COUNT_OFFSET)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- maintenance -------------------------------------------------------------------------

    def scan(self, stale_tmp_age_s: float) -> tuple[list[RowMeta], int]:
        """Start-up index rebuild: returns the valid rows' metadata and the corrupt count.

        Deletes ``*.tmp`` files older than ``stale_tmp_age_s`` (0 deletes all: only safe when
        no other process is writing to this directory), meta-parses every ``*.kvc`` with the
        key taken from its name (a name that is not 64 lowercase hex digits is corrupt), and
        removes the corrupt ones. Payload checksums are left to ``read``, which always checks
        them. Files vanishing meanwhile (another process) are skipped; files we may not open
        are left alone. The count is of corrupt entries found (each removed when possible).
        """
        return self.scan_unknown((), stale_tmp_age_s)

    def scan_unknown(
        self, known: Container[bytes], stale_tmp_age_s: float
    ) -> tuple[list[RowMeta], int]:
        """``scan``, skipping rows whose key is in ``known`` (the periodic sweep: find rows
        published by another process or orphaned by a dead writer, without re-reading the
        rows already indexed)."""
        self._sweep(stale_tmp_age_s)
        dfd = self._fd()
        metas: list[RowMeta] = []
        corrupt = 0
        with os.scandir(dfd) as it:
            names = [e.name for e in it if e.name.endswith(_ROW_SUFFIX)]
        for name in names:
            if not _ROW_NAME.fullmatch(name):
                self._unlink_quiet(name)
                corrupt += 1
                continue
            key = bytes.fromhex(name[: -len(_ROW_SUFFIX)])
            if key in known:
                continue
            try:
                fd, st = open_row(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except CorruptRow:
                self._remove_corrupt(name, None)
                corrupt += 1
                continue
            except OSError:
                continue
            try:
                metas.append(read_meta(fd, st.st_size, key))
            except CorruptRow:
                self._remove_corrupt(name, st)
                corrupt += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return metas, corrupt

    def row_keys(self) -> set[bytes]:
        """Keys of the entries named like rows (one listing; nothing is opened or checked)."""
        with os.scandir(self._fd()) as it:
            return {
                bytes.fromhex(e.name[: -len(_ROW_SUFFIX)])
                for e in it
                if _ROW_NAME.fullmatch(e.name)
            }

    def sweep_tmps(self, max_age_s: float) -> int:
        """Delete ``*.tmp`` files last modified ``max_age_s`` or more ago; returns how many.

        Pick an age well above the longest write (a live writer's temp must not go).
        """
        return self._sweep(max_age_s)

    def _sweep(self, max_age_s: float) -> int:
        dfd = self._fd()
        now = time.time()
        removed = 0
        with os.scandir(dfd) as it:
            names = [e.name for e in it if e.name.endswith(_TMP_SUFFIX)]
        for name in names:
            if max_age_s > 0:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if now - st.st_mtime < max_age_s:
                    continue
            removed += self._unlink_quiet(name)
        return removed
