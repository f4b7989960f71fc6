"""Shared fixtures. Async tests run on both asyncio and trio via anyio's pytest plugin."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

import erllama
from erllama.backends import stub
from erllama.cache.tiers import FileTier
from erllama.plugins import BackendRegistry

from .helpers import unblock_stubs


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def registry() -> BackendRegistry:
    """A fresh registry holding only the stub: tests never autoload entry points."""
    return erllama.make_backend_registry({"stub": stub}, autoload=False)


@pytest.fixture
def no_cache() -> erllama.EngineConfig:
    return erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))


@pytest.fixture
def cache_config(tmp_path: Path) -> erllama.EngineConfig:
    """All three tiers on, in per-test directories (never the real /dev/shm default)."""
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(
            ram_file_dir=tmp_path / "shm",
            disk_dir=tmp_path / "disk",
        )
    )


@pytest.fixture
async def engine(
    registry: BackendRegistry, no_cache: erllama.EngineConfig
) -> AsyncIterator[erllama.Engine]:
    async with erllama.open_engine(no_cache, backends=registry) as eng:
        try:
            yield eng
        finally:
            unblock_stubs(eng)


@attrs.frozen
class FullDisk:
    """A cache directory where every write fails with ENOSPC."""

    #: Give it as ``disk_dir``: it exists, 0700, and is empty.
    path: Path
    #: True: a real, full filesystem (a tiny tmpfs). False: mount was not permitted, so
    #: ``FileTier.write_tmp`` is patched to fail as a full disk does.
    real: bool


def _mount_tmpfs(at: Path, size: str) -> bool:
    at.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(at)],
            capture_output=True,
            check=False,
        )
    except OSError:  # no mount(8) at all
        return False
    return done.returncode == 0


def _fill(fs: Path) -> None:
    """Write a ballast file until the filesystem has no byte left."""
    chunk = b"\0" * 4096
    with open(fs / "ballast", "wb", buffering=0) as f:
        while True:
            try:
                if f.write(chunk) != len(chunk):
                    break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    """A full filesystem for a disk tier: a 1 MiB tmpfs filled to the brim where mounting is
    permitted (unmounted afterwards), else a patched ``write_tmp`` failing with ENOSPC."""
    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "1m"):

        def no_space(self: FileTier, *a: object) -> Path:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(FileTier, "write_tmp", no_space)
        (fs / "rows").mkdir(mode=0o700)
        yield FullDisk(fs / "rows", real=False)
        return
    try:
        (fs / "rows").mkdir(mode=0o700)  # before filling: a full tmpfs may refuse mkdir too
        _fill(fs)
        yield FullDisk(fs / "rows", real=True)
    finally:
        # Lazy if still busy: a failed test may leave an fd open; never leave a mount behind.
        if subprocess.run(["umount", str(fs)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True, check=False)
