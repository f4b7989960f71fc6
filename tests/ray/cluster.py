"""One small local Ray instance with Serve, shared by every test that needs one.

Starting Ray and Serve costs about ten seconds on two cores, so the session starts it once
(``ray_serve`` in tests/conftest.py) and each test module deploys the application it needs
under its own name and route prefix, and deletes it after. Everything listens on loopback
only; replicas reserve no CPU (``num_cpus=0``) so several fit on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from erllama.events import Done, Event
from erllama.ray.wire import Accepted, Failed, GenerateRequest

#: Object store for the whole instance: rows of stub models are a few KiB.
OBJECT_STORE_BYTES = 128 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class LocalServe:
    """The session's Ray instance: ``deploy`` an application, get its base URL."""

    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextmanager
    def deployed(self, name: str, app: Any) -> Iterator[str]:
        """``app`` served under ``/name`` while the block runs; yields its base URL."""
        from ray import serve

        from erllama.ray.app import wait_until_serving

        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        try:
            wait_until_serving(name)
            yield f"{self.base_url}/{name}"
        finally:
            serve.delete(name)


@contextmanager
def local_serve() -> Iterator[LocalServe]:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield LocalServe(port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ---- driving replicas from the test process (the router runs here) ----------------------------


@attrs.frozen
class Reply:
    replica: str
    fetched_tokens: int
    events: list[Event]

    @property
    def done(self) -> Done:
        last = self.events[-1]
        assert isinstance(last, Done), last
        return last


def generate(handle: Any, request: GenerateRequest) -> Reply:
    """Run one request to its end through ``handle`` (its router places it)."""
    stream = handle.options(stream=True, method_name="generate").remote(request)
    items = list(stream)
    first = items[0]
    if isinstance(first, Failed):
        raise first.error()
    assert isinstance(first, Accepted), first
    return Reply(first.replica, first.fetched_tokens, items[1:])


def where(handle: Any, request: GenerateRequest) -> str:
    """The replica the router would pick for ``request`` now (nothing is sent).

    The router counts what it chose before Serve confirms sending it, for up to
    ``PROVISIONAL_S``, and cannot tell a choice that will never be sent: this waits that
    out, so that asking leaves no trace on the next placement."""
    from erllama.ray.placement import PROVISIONAL_S

    async def pick() -> str:
        async with handle.options(method_name="generate").choose_replica(request) as selection:
            return str(selection.replica_id)

    chosen = asyncio.run(pick())
    time.sleep(PROVISIONAL_S)
    return chosen


def where_all(handle: Any, requests: list[GenerateRequest]) -> list[str]:
    """Where the router places ``requests`` arriving together (nothing is sent): Serve
    routes them all before it confirms any. Waits the choices out as :func:`where` does."""
    from erllama.ray.placement import PROVISIONAL_S

    async def pick(request: GenerateRequest) -> str:
        async with handle.options(method_name="generate").choose_replica(request) as selection:
            return str(selection.replica_id)

    async def picks() -> list[str]:
        return list(await asyncio.gather(*(pick(r) for r in requests)))

    chosen = asyncio.run(picks())
    time.sleep(PROVISIONAL_S)
    return chosen


def expected_in(handle: Any, request: GenerateRequest, holder: str) -> float | None:
    """How soon the router expects ``holder`` to hold the prefix of ``request`` it sent
    there and ``holder`` is still prefilling (``request.filling``, which a replica reads to
    decide whether to wait for that row); None when it expects no such row there.

    Asks with a copy pinned to ``holder``: the choice counts on ``holder`` for up to
    ``PROVISIONAL_S`` (as :func:`where` explains), with a prompt it was already sent, so
    it changes neither where other requests go nor what they expect of ``holder``."""
    probe = attrs.evolve(request, pin=holder, holders={}, filling={})

    async def pick() -> None:
        async with handle.options(method_name="generate").choose_replica(probe):
            pass

    asyncio.run(pick())
    found = probe.filling.get(holder)
    return None if found is None else found[1]


def wait_until(predicate: Callable[[], bool], within: float = 60.0, what: str = "it") -> None:
    """Poll ``predicate`` (a fact another process makes true) for at most ``within`` s.

    The bound is a hang guard, not a timing: replicas report every few hundred ms. (Routing
    tests once waited 20 s and later 60 s here: the router kept Serve's last queue-length
    estimate after it expired, and an idle replica whose report did not change stayed
    "busy"; Placement._load_now explains the fix.)"""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        time.sleep(0.05)
