"""Operations: /health, /metrics, and the admin routes (list, load, unload) with their
guard on which files a request may make the server load."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from erllama.plugins import BackendRegistry

from ..helpers import gated, stub_config, wait_for
from .conftest import Server, chat_body, messages_body, running_server, serve_config

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_health_says_ok(server: Server) -> None:
    async with server.http() as h:
        r = await h.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_metrics_count_requests_tokens_cache_and_engine_state(server: Server) -> None:
    async with server.http() as h:
        before = samples((await h.get("/metrics")).text)
        await h.post("/v1/chat/completions", json=chat_body(max_tokens=32))
        await h.post("/v1/messages", json=messages_body(max_tokens=2))
        await h.post("/v1/chat/completions", json=chat_body("nope"))
        r = await h.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("erllama_requests_total", api="openai", model="plain", outcome="stop") == 1
    assert delta("erllama_requests_total", api="anthropic", model="plain", outcome="length") == 1
    assert delta("erllama_requests_total", api="openai", model="unknown", outcome="invalid") == 1
    assert delta("erllama_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("erllama_http_requests_total", route="/v1/chat/completions", status="404") == 1
    assert delta("erllama_generated_tokens_total", model="plain") >= 7
    assert delta("erllama_time_to_first_token_seconds_count", model="plain") == 2
    assert delta("erllama_request_duration_seconds_count", model="plain") == 2
    assert (
        delta("erllama_request_cache_hits_total", model="plain", kind="cold")
        + delta("erllama_request_cache_hits_total", model="plain", kind="partial")
        + delta("erllama_request_cache_hits_total", model="plain", kind="exact")
        == 2
    )
    for name in ("erllama_cache_restored_tokens_total", "erllama_prompt_tokens_total"):
        assert (name, (("model", "plain"),)) in after
    assert value(after, "erllama_queue_depth", model="plain") == 0
    assert value(after, "erllama_model_status", model="plain", status="idle") == 1
    for tier in ("ram", "ram_file", "disk"):
        assert ("erllama_kv_cache_bytes", (("tier", tier),)) in after
    assert ("erllama_pressure_rounds_total", ()) in after
    assert ("erllama_kv_cache_lookups_total", (("result", "miss"),)) in after
    assert value(after, "erllama_requests_in_flight", api="openai") == 0


async def test_metrics_speak_openmetrics_when_asked(server: Server) -> None:
    async with server.http() as h:
        r = await h.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")


# ---- admin -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / "small.gguf").write_bytes(b"stub weights")
    (folder / "notes.txt").write_text("not a model")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.gguf"
    outside.write_bytes(b"not yours")
    os.symlink(outside, folder / "link.gguf")
    return folder


@pytest.fixture(scope="module")
async def admin_server(
    anyio_backend: str, stub_registry: BackendRegistry, models_dir: Path
) -> AsyncIterator[Server]:
    config = serve_config(models_dir=models_dir)
    async with running_server(config, stub_registry) as srv:
        yield srv


async def test_admin_lists_loads_and_unloads_models(admin_server: Server) -> None:
    async with admin_server.http() as h:
        listed = (await h.get("/admin/models")).json()
        assert {m["id"] for m in listed["models"]} >= {"plain", "tools"}
        assert listed["loading"] == []
        r = await h.post(
            "/admin/models",
            json={"id": "extra", "backend": "stub", "model_path": "small.gguf", "n_ctx": 256},
        )
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "extra" and r.json()["n_ctx"] == 256
        served = await h.post("/v1/chat/completions", json=chat_body("extra", max_tokens=2))
        assert served.status_code == 200
        again = await h.post("/admin/models", json={"id": "extra", "backend": "stub"})
        assert again.status_code == 409
        gone = await h.delete("/admin/models/extra")
        assert gone.status_code == 200 and gone.json() == {"id": "extra", "unloaded": True}
        after = await h.post("/v1/chat/completions", json=chat_body("extra"))
        assert after.status_code == 404
        assert (await h.delete("/admin/models/extra")).status_code == 404


async def test_admin_reloads_a_configured_model_by_id(admin_server: Server) -> None:
    async with admin_server.http() as h:
        assert (await h.delete("/admin/models/plain")).status_code == 200
        r = await h.post("/admin/models", json={"id": "plain"})
        assert r.status_code == 201, r.text
        ok = await h.post("/v1/chat/completions", json=chat_body(max_tokens=32))
    assert ok.json()["choices"][0]["message"]["content"] == " kabo rite sanu mila tove"


async def test_a_configured_model_an_admin_unloaded_loads_on_its_next_request(
    admin_server: Server,
) -> None:
    (known,) = [m for m in admin_server.engine.model_states() if m.id == "plain"]
    async with admin_server.http() as h:
        assert (await h.delete("/admin/models/plain")).status_code == 200
        assert "plain" not in {m.id for m in admin_server.engine.list_models()}
        listed = (await h.get("/v1/models")).json()["data"]
        assert {m["id"]: m["status"]["value"] for m in listed}["plain"] == "unloaded"
        ok = await h.post("/v1/chat/completions", json=chat_body(max_tokens=32))
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == " kabo rite sanu mila tove"
        again = await h.post("/admin/models", json={"id": "plain"})
        assert again.status_code == 409  # loaded already, by the request
        lifecycle = (await h.get("/admin/models")).json()["lifecycle"]
    plain = {m["id"]: m for m in lifecycle}["plain"]
    assert plain["state"] == "loaded" and plain["loads"] == known.loads + 1
    assert plain["unloads"] == {"unload": known.unloads.get("unload", 0) + 1}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model_path": "/etc/passwd"}, 403, "model_path"),
        ({"model_path": "../elsewhere/secret.gguf"}, 403, "model_path"),
        ({"model_path": "link.gguf"}, 403, "model_path"),  # a symlink out of the folder
        ({"model_path": "notes.txt"}, 403, "model_path"),
        ({"model_path": 5}, 400, "model_path"),
        ({"options": {"script": "x"}}, 400, "options"),
        ({"backend": "llama_cpp"}, 400, "backend"),
        ({"n_ctx": "big"}, 400, "n_ctx"),
        ({"id": "../x"}, 400, "id"),
    ],
)
async def test_admin_loads_only_what_the_config_allows(
    admin_server: Server, body: dict[str, object], status: int, param: str
) -> None:
    request = {"id": "probe", "backend": "stub", **body}
    async with admin_server.http() as h:
        r = await h.post("/admin/models", json=request)
    assert r.status_code == status, r.text
    assert param in r.json()["error"]["param"]
    assert "probe" not in {m.id for m in admin_server.engine.list_models()}


async def test_admin_routes_can_be_turned_off(stub_registry: BackendRegistry) -> None:
    async with running_server(serve_config(admin=False), stub_registry) as srv, srv.http() as h:
        assert (await h.get("/admin/models")).status_code == 404


async def test_unloading_a_model_mid_request_ends_it_with_a_503(admin_server: Server) -> None:
    control = gated()
    await admin_server.engine.load_model("doomed", stub_config(control=control))
    async with admin_server.http() as h, anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await h.post("/v1/chat/completions", json=chat_body("doomed")))

        tg.start_soon(ask)
        try:
            await wait_for(lambda: control.waiting == 1)
            async with anyio.create_task_group() as unloading:
                unloading.start_soon(h.delete, "/admin/models/doomed")
                await wait_for(lambda: admin_server.engine.status("doomed") == "unloading")
                control.open()
        finally:
            control.open()
    (answer,) = answers
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "cancelled"
