"""Shared fixtures. Async tests run on both asyncio and trio via anyio's pytest plugin.

Hypothesis runs under one of two profiles, named by ``HYPOTHESIS_PROFILE``:

- ``ci``: derandomized (the same examples on every run, so a red CI is reproducible and a
  green one is not luck), ``CI_EXAMPLES`` examples a test, failures printed with their
  reproduction blob, no example database. The default where ``CI`` is set or no one is at
  a terminal; ``scripts/test.sh`` names it.
- ``dev``: random examples, a third as many (a quick local run), the local database
  (``.hypothesis/``) replaying earlier failures first.

Neither has a deadline: on a shared machine one slow example is load, not a bug. Tests
never hard-code these; a test whose examples cost more or less than most asks for a share
of the profile's count (:func:`tests.helpers.examples`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import erllama
from erllama.backends import stub
from erllama.plugins import BackendRegistry

from .helpers import SmallDisk, unblock_stubs

#: Examples a hypothesis test runs in CI (the ``ci`` profile).
CI_EXAMPLES = 150

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=CI_EXAMPLES,
    deadline=None,
    print_blob=True,
)
settings.register_profile("dev", max_examples=CI_EXAMPLES // 3, deadline=None, print_blob=True)


def _default_profile() -> str:
    if os.environ.get("CI"):
        return "ci"
    # Someone at a terminal has one controlling it. (Not ``sys.stdin.isatty()``: pytest's
    # capture has already put /dev/null on stdin when this file is read.)
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY))
    except OSError:
        return "ci"
    return "dev"


settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _default_profile())


def pytest_report_header(config: pytest.Config) -> str | None:
    # Hypothesis's own header line shows only with -v.
    if config.option.verbose >= 1:
        return None
    return f"hypothesis profile: {settings.get_current_profile_name()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on the session's Ray instance runs last, in its collected order.

    A Ray instance, once up, lives to the end of the session (``ray_serve``), and its
    daemons and replicas take CPU in the background. llama.cpp runs its two threads on
    both cores and meets them at a spinning barrier each graph node, so any other runnable
    process can make a real-model test several times slower (one ran past the 300 s
    timeout in CI). With Ray last, no real-model test shares the machine with it."""
    del config

    def on_ray(item: pytest.Item) -> bool:
        # The server tests reach Ray through a parameter marked ``ray``, not a fixture name.
        return item.get_closest_marker("ray") is not None or "ray_serve" in getattr(
            item, "fixturenames", ()
        )

    items[:] = sorted(items, key=on_ray)


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
            unblock_stubs()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """A 1 MiB filesystem for a disk tier, made full by ``fill()``; see :class:`SmallDisk`."""
    with SmallDisk.mounted(tmp_path / "fs", monkeypatch) as disk:
        yield disk


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[object]:
    """One local Ray instance with Serve for the whole session (tests/ray/cluster.py);
    skipped without the ray extra."""
    pytest.importorskip("ray.serve", reason="needs the ray extra")
    from .ray.cluster import local_serve

    with local_serve() as instance:
        yield instance
