"""A client that goes away cancels its request inside the model within one step; the model
is idle after and serves the next request.

The stub model is metered: each step needs a permit the test hands out, so "within one
step" is counted, not timed."""

from __future__ import annotations

import json
import re

import anyio
import httpx
import pytest

from erllama.backends.stub import StubControl
from erllama.plugins import BackendRegistry

from ..helpers import metered, release, stub_config, wait_for
from .conftest import (
    Served,
    Server,
    chat_body,
    messages_body,
    own_model,
    running_server,
    serve_config,
)

pytestmark = pytest.mark.anyio


def in_flight(server: Server, api: str) -> float:
    return server.state.metrics.in_flight.labels(api)._value.get()


def outcomes(server: Server, api: str, model: str, outcome: str) -> float:
    return server.state.metrics.requests.labels(api, model, outcome)._value.get()


async def steps_until_idle(server: Server, model: str, control: StubControl) -> int:
    """Hand out permits one at a time until the model is idle; how many it took."""
    assert control.permits is not None

    def idle() -> bool:
        return server.engine.status(model) == "idle"

    for given in range(5):
        if idle():
            return given
        release(control, 1)
        # Then the model either goes idle or parks at its next step.
        await wait_for(lambda: idle() or (control.waiting == 1 and control.permits._value == 0))  # type: ignore[union-attr]
    return 99


#: The ``api`` label of each route's requests.
APIS = {
    "/v1/chat/completions": "openai",
    "/v1/messages": "anthropic",
    "/v1/responses": "responses",
    "/api/chat": "ollama",
}


def responses_body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "input": "hello", **extra}


def ollama_body(model: str, num_predict: int) -> dict[str, object]:
    # Ollama streams unless told not to.
    return {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "options": {"num_predict": num_predict}}  # fmt: skip


def is_event(line: str) -> bool:
    """An SSE data line, or one of Ollama's JSON lines."""
    return line.startswith(("data:", "{"))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat_body("", stream=True, max_tokens=200)),
    ("/v1/messages", messages_body("", stream=True, max_tokens=200)),
    ("/v1/responses", responses_body("", stream=True, max_output_tokens=200)),
    ("/api/chat", ollama_body("", 200)),
])  # fmt: skip
async def test_a_stream_the_client_leaves_is_cancelled_within_one_step(
    server: Server, path: str, body: dict[str, object]
) -> None:
    api = APIS[path]
    async with own_model(server, control=metered()) as (mid, control):
        before = outcomes(server, api, mid, "disconnected")
        release(control, 3)  # prefill and two tokens; the model then waits
        async with server.http() as h, h.stream("POST", path, json={**body, "model": mid}) as r:
            assert r.status_code == 200
            data_lines = 0
            async for line in r.aiter_lines():
                data_lines += is_event(line)
                # Tokens arrived: Ollama's first lines are tokens, the others' follow an
                # opening event or two; the model is then held after its second token.
                if data_lines == (2 if path == "/api/chat" else 3):
                    break
        # Leaving the block closed the connection mid-stream.
        await wait_for(lambda: control.waiting == 1)  # the model is parked at its next step
        await wait_for(lambda: in_flight(server, api) == 0)  # the server closed the stream
        assert await steps_until_idle(server, mid, control) <= 1
        assert outcomes(server, api, mid, "disconnected") == before + 1
        # The model serves the next request.
        control.open()
        async with server.http() as h:
            r = await h.post("/v1/chat/completions", json=chat_body(mid, max_tokens=3))
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(
                dict(re.findall(r'(\w+)="([^"]*)"', head)).get(k) == v for k, v in labels.items()
            ):
                return float(value)
    return 0.0


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat_body("slow", stream=True, max_tokens=250)),
    ("/v1/messages", messages_body("slow", stream=True, max_tokens=250)),
    ("/v1/responses", responses_body("slow", stream=True, max_output_tokens=250)),
    ("/api/chat", ollama_body("slow", 250)),
])  # fmt: skip
async def test_a_stream_the_client_leaves_ends_its_request_in_the_model(
    served: Served, path: str, body: dict[str, object]
) -> None:
    """Seen over HTTP only, so it holds on both servers: the "slow" model would stream for
    25 s, but once the client leaves it is idle again and the request counts as
    disconnected."""
    api = APIS[path]
    labels = {"api": api, "model": "slow", "outcome": "disconnected"}
    async with served.http() as h:
        before = metric((await h.get("/metrics")).text, "erllama_requests_total", **labels)
        async with h.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            data_lines = 0
            async for line in r.aiter_lines():
                data_lines += is_event(line)
                if data_lines == 5:  # tokens are flowing
                    break

        async def ended() -> bool:
            text = (await h.get("/metrics")).text
            idle = metric(text, "erllama_queue_depth", model="slow") == 0
            return idle and metric(text, "erllama_requests_total", **labels) == before + 1

        await wait_for(
            ended, what="the model idle and the request counted as disconnected", every=0.05
        )


async def test_a_non_streaming_request_the_client_leaves_is_cancelled(server: Server) -> None:
    async with own_model(server, control=metered()) as (mid, control):
        async with server.http() as h, anyio.create_task_group() as tg:

            async def ask() -> None:
                await h.post("/v1/chat/completions", json=chat_body(mid, max_tokens=200))

            tg.start_soon(ask)
            release(control, 2)
            await wait_for(lambda: control.steps >= 3 and control.waiting == 1)
            tg.cancel_scope.cancel()  # the client gives up: httpx closes the connection
        await wait_for(lambda: in_flight(server, "openai") == 0)
        assert await steps_until_idle(server, mid, control) <= 1
        assert outcomes(server, "openai", mid, "disconnected") >= 1


async def test_the_sse_wire_format(server: Server) -> None:
    """What a hand-rolled client sees: data lines ending in [DONE]; named Anthropic events."""
    async with server.http() as h:
        r = await h.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=3))
        a = await h.post("/v1/messages", json=messages_body(stream=True, max_tokens=3))
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    lines = [line for line in r.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])
    events = [block.split("\n") for block in a.text.split("\n\n") if block]
    assert all(e[0].startswith("event: ") and e[1].startswith("data: ") for e in events)
    names = [e[0][7:] for e in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"


async def test_the_server_stops_while_a_stream_is_open(stub_registry: BackendRegistry) -> None:
    """Leaving open_server with a client mid-stream ends within the graceful timeout: the
    stream is cut (no [DONE]), the request cancelled, the engine closes."""
    rest: list[str] = []
    with anyio.fail_after(20):
        async with running_server(serve_config(), stub_registry) as srv:
            control = metered()
            await srv.engine.load_model("held", stub_config(control=control))
            release(control, 2)
            h = httpx.AsyncClient(base_url=srv.url, timeout=30)
            request = h.build_request(
                "POST", "/v1/chat/completions", json=chat_body("held", stream=True)
            )
            r = await h.send(request, stream=True)
            assert r.status_code == 200
            lines = r.aiter_lines()
            await lines.__anext__()
        try:
            async for line in lines:
                rest.append(line)
        except httpx.HTTPError:
            pass  # the connection was cut mid-body
        await r.aclose()
        await h.aclose()
    assert "data: [DONE]" not in rest
