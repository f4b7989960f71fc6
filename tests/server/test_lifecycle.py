"""``erllama serve``'s model lifecycle: configured models load on their first request,
requests arriving during a load wait for it (bounded: 503 and Retry-After beyond),
``max_loaded_models`` unloads the least recently used idle model, and the model routes and
/metrics say which models are loaded, loading or unloaded.

Each test runs a server of its own (its models are loaded and unloaded under it).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import httpx
import pytest

import erllama
from erllama.backends.stub import StubControl
from erllama.plugins import BackendRegistry
from erllama.server import ServeConfig, ServerConfig

from ..helpers import stub_config, wait_for
from .conftest import PLAIN_SCRIPT, Server, chat_body, running_server

pytestmark = pytest.mark.anyio


def config(models: dict[str, erllama.ModelConfig], **top: Any) -> ServeConfig:
    server = top.pop("server", {})
    return ServeConfig(
        server=ServerConfig(port=0, graceful_timeout_s=0.5, max_tokens=64, **server),
        cache=erllama.CacheConfig(enabled=False, ram_file_dir=None),
        models=models,
        **top,
    )


@asynccontextmanager
async def serving(
    registry: BackendRegistry, cfg: ServeConfig
) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    async with running_server(cfg, registry) as srv, srv.http() as http:
        yield srv, http


def states(srv: Server) -> dict[str, str]:
    return {m.id: m.state for m in srv.engine.model_states()}


def holds(srv: Server, model_id: str) -> int:
    return next(m.holds for m in srv.engine.model_states() if m.id == model_id)


def scripted(**options: Any) -> erllama.ModelConfig:
    return stub_config(script=PLAIN_SCRIPT, **options)


async def chat(http: httpx.AsyncClient, model: str) -> httpx.Response:
    return await http.post("/v1/chat/completions", json=chat_body(model, max_tokens=32))


async def test_configured_models_load_on_their_first_request(
    stub_registry: BackendRegistry,
) -> None:
    cfg = config({"a": scripted(), "b": scripted()}, preload=[], max_loaded_models=1)
    async with serving(stub_registry, cfg) as (srv, http):
        assert states(srv) == {"a": "unloaded", "b": "unloaded"}
        listed = (await http.get("/v1/models")).json()["data"]
        assert [(m["id"], m["status"]["value"]) for m in listed] == [
            ("a", "unloaded"),
            ("b", "unloaded"),
        ]
        assert listed[0]["erllama"]["last_used_at"] is None
        r = await chat(http, "a")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == " " + PLAIN_SCRIPT
        assert states(srv) == {"a": "loaded", "b": "unloaded"}
        # b needs a's place: a, idle, is unloaded first.
        assert (await http.post("/v1/messages/count_tokens", json=messages("b"))).status_code == 200
        assert states(srv) == {"a": "unloaded", "b": "loaded"}
        one = (await http.get("/v1/models/a")).json()
        assert one["status"] == {"value": "unloaded"}
        assert one["erllama"]["last_used_at"] is not None
        assert (await http.get("/v1/models/nope")).status_code == 404
        metrics = (await http.get("/metrics")).text
    assert 'erllama_model_state{model="a",state="unloaded"} 1.0' in metrics
    assert 'erllama_model_state{model="b",state="loaded"} 1.0' in metrics
    assert 'erllama_model_unloads_total{model="a",reason="max_loaded_models"} 1.0' in metrics
    assert 'erllama_model_loads_total{model="a"} 1.0' in metrics
    assert 'erllama_model_last_used_timestamp_seconds{model="b"}' in metrics


def messages(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


async def test_requests_arriving_during_a_load_wait_for_it(
    stub_registry: BackendRegistry,
) -> None:
    control = StubControl(load_gate=threading.Event())
    cfg = config({"a": scripted(control=control)}, preload=[])
    async with serving(stub_registry, cfg) as (srv, http):
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await chat(http, "a"))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(ask)
            await wait_for(lambda: holds(srv, "a") == 3)
            assert states(srv) == {"a": "loading"}
            listed = (await http.get("/v1/models")).json()["data"]
            assert listed[0]["status"]["value"] == "loading"
            control.load_gate.set()  # type: ignore[union-attr]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert next(m.loads for m in srv.engine.model_states()) == 1


async def test_a_load_longer_than_load_wait_s_is_a_503_with_retry_after(
    stub_registry: BackendRegistry,
) -> None:
    control = StubControl(load_gate=threading.Event())
    cfg = config({"a": scripted(control=control)}, preload=[], server={"load_wait_s": 0.05})
    async with serving(stub_registry, cfg) as (srv, http):
        r = await chat(http, "a")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"] == "1"
        o = await http.post("/api/chat", json={**messages("a"), "stream": False})
        assert o.status_code == 503 and "not ready" in o.json()["error"]
        control.load_gate.set()  # type: ignore[union-attr]
        await wait_for(lambda: states(srv) == {"a": "loaded"})
        assert (await chat(http, "a")).status_code == 200


async def test_ollamas_load_duration_is_the_wait_for_the_model(
    stub_registry: BackendRegistry,
) -> None:
    control = StubControl(load_gate=threading.Event())
    cfg = config({"a": scripted(control=control)}, preload=[])
    async with serving(stub_registry, cfg) as (_, http):
        async with anyio.create_task_group() as tg:
            answers: list[dict[str, Any]] = []

            async def ask() -> None:
                r = await http.post("/api/chat", json={**messages("a"), "stream": False})
                answers.append(r.json())

            tg.start_soon(ask)
            await wait_for(lambda: control.waiting > 0)
            await anyio.sleep(0.05)  # a wall-clock wait on purpose: the load takes 50 ms
            control.load_gate.set()  # type: ignore[union-attr]
        (first,) = answers
        assert first["done"] and first["load_duration"] >= 50_000_000  # ns: it waited 50 ms
        assert first["load_duration"] <= first["total_duration"]
        again = (await http.post("/api/chat", json={**messages("a"), "stream": False})).json()
        assert again["load_duration"] < 50_000_000  # loaded already


async def test_a_model_that_fails_to_load_is_a_503_and_is_tried_again(
    stub_registry: BackendRegistry,
) -> None:
    cfg = config({"bad": scripted(fail_at="load"), "good": scripted()}, preload=["good"])
    async with serving(stub_registry, cfg) as (srv, http):
        for _ in range(2):
            r = await chat(http, "bad")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_load_failed"
            assert r.headers["x-should-retry"] == "false"
        bad = next(m for m in srv.engine.model_states() if m.id == "bad")
        assert bad.state == "unloaded" and bad.loads == 0 and bad.last_error
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        assert "injected failure" in listed["bad"]["erllama"]["last_error"]
        assert (await chat(http, "good")).status_code == 200


async def test_ollama_lists_every_model_and_reports_expiry(
    stub_registry: BackendRegistry,
) -> None:
    models = {"a": attrs.evolve(scripted(), keep_alive_s=600), "b": scripted()}
    async with serving(stub_registry, config(models, preload=["b"])) as (srv, http):
        tags = (await http.get("/api/tags")).json()["models"]
        assert sorted(m["name"] for m in tags) == ["a:latest", "b:latest"]
        assert (await http.get("/api/ps")).json()["models"][0]["name"] == "b:latest"
        r = await http.post("/api/generate", json={"model": "a", "prompt": "", "stream": False})
        assert r.json()["done_reason"] == "load"
        ps = {m["name"]: m for m in (await http.get("/api/ps")).json()["models"]}
        assert ps["b:latest"]["expires_at"].startswith("2318-")  # kept for good
        a = next(m for m in srv.engine.model_states() if m.id == "a")
        assert a.expires_at is not None and a.keep_alive_s == 600
        assert ps["a:latest"]["expires_at"][:4] != "2318"


async def test_erllama_keep_alive_on_the_openai_and_anthropic_routes(
    stub_registry: BackendRegistry,
) -> None:
    cfg = config({"a": scripted()}, preload=["a"])
    async with serving(stub_registry, cfg) as (srv, http):
        body = {**messages("a"), "max_tokens": 8, "erllama": {"keep_alive": "5m"}}
        assert (await http.post("/v1/messages", json=body)).status_code == 200
        (a,) = srv.engine.model_states()
        assert a.keep_alive_s == 300 and a.expires_at is not None
        bad = await http.post(
            "/v1/chat/completions", json={**chat_body("a"), "erllama": {"keep_alive": "soon"}}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "erllama.keep_alive"
        for route, extra in (
            ("/v1/chat/completions", chat_body("a", max_tokens=4)),
            ("/v1/completions", {"model": "a", "prompt": "hello", "max_tokens": 4}),
        ):
            r = await http.post(route, json={**extra, "erllama": {"keep_alive": 0}})
            assert r.status_code == 200, r.text
            await wait_for(lambda: states(srv) == {"a": "unloaded"})
        # Without one, a request sets the model's own keep-alive back (for good here).
        assert (await chat(http, "a")).status_code == 200
        (a,) = srv.engine.model_states()
        assert a.state == "loaded" and a.keep_alive_s is None and a.expires_at is None
