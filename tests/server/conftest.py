"""The server under test: the real Hypercorn server on a free loopback port, in the test's
own event loop (asyncio and trio), over an engine of stub models.

One server per test module and loop (``anyio_backend`` is module-scoped here), so a module
pays for one engine; tests that need a model of their own (held by a gate, metered step by
step, made to fail) load one into it under a fresh id and unload it after.

Protocol tests that only speak HTTP take ``served`` instead of ``server``: they run against
``erllama serve`` and against the same app on Ray Serve (``erllama.ray``: two stub
replicas behind the cache-aware router, deployed once per session on the session's local
Ray instance), so both are held to the same behaviour.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import sniffio

import erllama
from erllama.backends import stub
from erllama.backends.stub import StubControl
from erllama.plugins import BackendRegistry
from erllama.server import RunningServer, ServeConfig, ServerConfig, open_server
from erllama.server.state import ServerState

from ..helpers import stub_config, unblock_stubs

KEY = "sk-test-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
#: What a raw body needs to be read at all (the server refuses any other content type).
JSON_TYPE = {"content-type": "application/json"}
SIGNING_KEY = "thinking-signing-key"
TOOL_MARKERS = erllama.ToolCallMarkers(start="<tool_call>", end="</tool_call>")
THINK_MARKERS = erllama.ThinkingMarkers(start="<think>", end="</think>")

#: What the scripted stub models say, whatever they are asked.
PLAIN_SCRIPT = "kabo rite sanu mila tove"
CALL_JSON = '{"name":"get_weather","arguments":{"city":"Paris"}}'
TOOL_SCRIPT = f"Let me check. <tool_call> {CALL_JSON} </tool_call>"
THINK_SCRIPT = "<think> kabo rite </think> sanu mila"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    },
}
ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
}


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def stub_registry() -> BackendRegistry:
    return erllama.make_backend_registry({"stub": stub}, autoload=False)


def stub_models() -> dict[str, erllama.ModelConfig]:
    return {
        "plain": stub_config(script=PLAIN_SCRIPT),
        "tools": attrs.evolve(stub_config(script=TOOL_SCRIPT), tool_call_markers=TOOL_MARKERS),
        "thinker": attrs.evolve(stub_config(script=THINK_SCRIPT), thinking_markers=THINK_MARKERS),
        "free": stub_config(eog_every=0),
        # 0.1 s a step: a request of 250 tokens would run for 25 s unless cancelled.
        "slow": stub_config(step_delay_s=0.1),
    }


def serve_config(**server: Any) -> ServeConfig:
    settings: dict[str, Any] = {
        "port": 0,
        "graceful_timeout_s": 0.5,
        "max_tokens": 256,
        "max_body_bytes": 64 * 1024,
        "admin_backends": ("stub",),
        "admin": True,
    }
    settings.update(server)
    return ServeConfig(
        server=ServerConfig(**settings),
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        models=stub_models(),
        thinking_signing_key=SIGNING_KEY,
    )


@attrs.frozen
class Server:
    """A running server, and the engine behind it (tests look at the models directly)."""

    running: RunningServer
    engine: erllama.Engine
    #: The event loop serving it: every test must drive it from that loop.
    loop: str

    @property
    def url(self) -> str:
        """The base URL; asserts the caller runs on the server's loop (a module-scoped
        fixture that forgot ``anyio_backend`` would serve trio tests from asyncio)."""
        assert sniffio.current_async_library() == self.loop, "test and server loops differ"
        return self.running.url

    @property
    def state(self) -> ServerState:
        return self.running.state

    def http(self, **kw: Any) -> httpx.AsyncClient:
        """A raw HTTP client for this server (127.0.0.1 only)."""
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)


@asynccontextmanager
async def running_server(config: ServeConfig, registry: BackendRegistry) -> AsyncIterator[Server]:
    async with erllama.open_engine(config.engine_config(), backends=registry) as engine:
        try:
            async with open_server(engine, config) as running:
                assert running.url.startswith("http://127.0.0.1:")
                yield Server(running, engine, sniffio.current_async_library())
        finally:
            unblock_stubs()


@pytest.fixture(scope="module")
async def server(anyio_backend: str, stub_registry: BackendRegistry) -> AsyncIterator[Server]:
    """The module's server: stub models, no API key. (Every module-scoped async fixture
    names ``anyio_backend``: one that does not is kept from the asyncio run, and the trio
    tests would silently run on asyncio.)"""
    async with running_server(serve_config(), stub_registry) as srv:
        yield srv


@attrs.frozen
class RayServed:
    """The same app on Ray Serve: the ingress's base URL (its route prefix included)."""

    url: str

    def http(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)


#: Either server, as protocol tests see it: a base URL and an HTTP client.
Served = Server | RayServed


@pytest.fixture(scope="session")
def ray_server(ray_serve: Any) -> Iterator[RayServed]:
    from erllama.ray import ScaleOut, build_application

    app = build_application(serve_config(), ScaleOut(replicas=2, stats_period_s=0.5))
    with ray_serve.deployed("protocol", app) as url:
        yield RayServed(url)


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def served(request: pytest.FixtureRequest) -> Served:
    """``erllama serve`` (the module's server), or the same app on Ray Serve."""
    if request.param == "local":
        return request.getfixturevalue("server")  # type: ignore[no-any-return]
    return request.getfixturevalue("ray_server")  # type: ignore[no-any-return]


_ids = itertools.count()


@asynccontextmanager
async def own_model(server: Server, **options: Any) -> AsyncIterator[tuple[str, StubControl]]:
    """A stub model of the test's own in the shared server (options as in stub_config),
    unloaded after; its control is returned to hold or meter it."""
    control = options.pop("control", None) or StubControl()
    markers = options.pop("tool_call_markers", None)
    config = stub_config(control=control, **options)
    if markers is not None:
        config = attrs.evolve(config, tool_call_markers=markers)
    model_id = f"own-{next(_ids)}"
    await server.engine.load_model(model_id, config)
    try:
        yield model_id, control
    finally:
        control.open()
        await server.engine.unload(model_id)


def chat_body(model: str = "plain", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def messages_body(model: str = "plain", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients must reach 127.0.0.1 directly, whatever the environment says."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
