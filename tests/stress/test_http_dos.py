"""Hostile HTTP clients against a real ``erllama serve`` (Hypercorn, asyncio and trio):
connection churn, silent and trickling clients, slow bodies, more connections than the
server allows, clients that never read, half-closed and HTTP/1.0 clients, a stop with
streams in flight, and a server at its descriptor limit.

Each test reproduces a denial of service found by a black-box attack (issue 24) and pins
its fix; what each found is in its docstring. Facts are counted on the server (its
transport stats and metrics, /proc for descriptors and memory), never timed: every wait
has a generous bound and fails rather than hangs.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest

from ..helpers import wait_for
from .conftest import record
from .http_clients import (
    HOST,
    chat_request,
    fds,
    hostile_server,
    linux_only,
    never_reading,
    post_request,
    read_until_closed,
    reset,
    rss_mib,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120), linux_only]

FILE = "http dos"


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- descriptors -----------------------------------------------------------------------


async def test_connection_churn_leaves_no_descriptor_behind() -> None:
    """Found: a connection the client closed stayed open until the 75 s keep-alive timer
    (the timer task held the connection's task group; on trio with its descriptor), so a
    client opening a connection per request took a default server down in ~23 s."""
    async with hostile_server() as srv:
        request = f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()

        def churn(n: int) -> None:
            for i in range(n):
                sock = socket.create_connection(("127.0.0.1", srv.port))
                sock.sendall(request)
                sock.recv(65536)  # the response (or part of it)
                if i % 2:
                    reset(sock)  # gives up mid-response
                else:
                    sock.close()

        base = fds()
        n = 400
        await anyio.to_thread.run_sync(churn, n)
        await wait_for(lambda: srv.stats.open == 0, within=10)
        assert fds() <= base + 4
        assert srv.stats.accepted >= n
        record(f"{FILE}: connections churned", n)


@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "api-key"])
async def test_silent_and_trickling_clients_are_closed_at_the_header_timeout(
    keyed: bool,
) -> None:
    """Found: with --api-key, slow headers held connections; a fresh connection that sends
    nothing waited out the whole keep-alive timer."""
    keys = ("sk-stress-0123456789",) if keyed else ()
    async with hostile_server(api_keys=keys, header_timeout_s=0.5) as srv:
        silent = [await srv.connect() for _ in range(16)]
        trickling = [await srv.connect() for _ in range(16)]
        closed: list[bytes] = []

        async def trickle(stream: anyio.abc.SocketStream) -> None:
            try:
                for byte in b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Pad: ":
                    await stream.send(bytes([byte]))
                    await anyio.sleep(0.1)
                for _ in range(200):  # never ends its headers
                    await stream.send(b"a")
                    await anyio.sleep(0.1)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        async def until_closed(stream: anyio.abc.SocketStream) -> None:
            closed.append(await read_until_closed(stream, within=15))

        async with anyio.create_task_group() as tg:
            for stream in trickling:
                tg.start_soon(trickle, stream)
            for stream in silent + trickling:
                tg.start_soon(until_closed, stream)
        assert len(closed) == 32
        assert srv.stats.header_timeouts >= 32
        await wait_for(lambda: srv.stats.open == 0, within=10)
        async with srv.server.http() as h:
            assert (await h.get("/health")).status_code == 200
        record(f"{FILE}: silent and trickling clients closed", len(closed))


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    """Found: slow request bodies were never timed out."""
    async with hostile_server(body_timeout_s=0.5) as srv:
        stream = await srv.connect()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        await stream.send(head.encode() + b'{"model": "plain", ')
        answer = await read_until_closed(stream, within=10)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"request_timeout" in answer and b"connection: close" in answer.lower()
        assert srv.stats.body_timeouts == 1
        record(f"{FILE}: slow bodies answered 408", 1)


async def test_connections_beyond_the_cap_get_a_503_and_the_server_recovers() -> None:
    """Found: nothing capped connections; a server at its descriptor limit stopped
    answering anyone."""
    async with hostile_server(max_connections=8) as srv:
        held = []
        request = f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        for _ in range(8):
            stream = await srv.connect()
            await stream.send(request)
            assert (await stream.receive()).startswith(b"HTTP/1.1 200")
            held.append(stream)  # kept open, idle
        refused = []
        for _ in range(20):
            stream = await srv.connect()
            await stream.send(request)
            refused.append(await read_until_closed(stream, within=10))
        assert all(r.startswith(b"HTTP/1.1 503 ") for r in refused), refused[0][:200]
        assert all(b"retry-after: 1" in r and b"too_many_connections" in r for r in refused)
        assert srv.stats.refused == 20 and srv.stats.open == 8
        for stream in held:
            await stream.aclose()
        await wait_for(lambda: srv.stats.open == 0, within=10)
        async with srv.server.http() as h:
            assert (await h.get("/health")).status_code == 200
        record(f"{FILE}: connections refused at the cap", len(refused))


# ---- clients that never read ------------------------------------------------------------


async def test_clients_that_never_read_are_cut_and_memory_stays_flat() -> None:
    """Found: a client that never reads made the server's memory grow ~20 MiB/s (48 to
    917 MiB in 45 s) and its connection was never closed."""
    async with hostile_server(
        send_timeout_s=1.0, max_tokens=30_000, stream_buffer_bytes=64 * 2**20
    ) as srv:
        request = chat_request("long", max_tokens=30_000)
        rounds, per_round = 3, 4
        sizes = []
        for round_ in range(rounds):
            socks = await anyio.to_thread.run_sync(
                lambda: [never_reading(srv.port, request) for _ in range(per_round)]
            )
            try:
                want = (round_ + 1) * per_round
                await wait_for(lambda w=want: srv.stats.send_timeouts >= w, within=60)
                await wait_for(lambda: srv.server.engine.status("long") == "idle", within=30)
                await wait_for(lambda: srv.stats.open == 0, within=10)
            finally:
                for sock in socks:
                    sock.close()
            sizes.append(rss_mib())
        outcomes = {
            o: srv.outcomes("openai", "long", o)
            for o in ("disconnected", "stalled", "length", "stop", "error", "cancelled")
        }
        assert outcomes["disconnected"] == rounds * per_round, outcomes
        # Each stuck stream held megabytes (30,000 events); cut, they free them. Python
        # keeps some for reuse: the later rounds must not add to the first's.
        assert sizes[-1] - sizes[0] < 48, sizes
        record(f"{FILE}: never-reading clients cut", rounds * per_round)
        record(
            f"{FILE}: never-reading clients, MiB grown after round 1",
            round(max(0, sizes[-1] - sizes[0])),
        )


async def test_a_stream_read_too_slowly_is_cancelled_at_its_buffer_bound() -> None:
    """Bound what is buffered per stream: past server.stream_buffer_bytes the request is
    cancelled (counted as stalled), whatever the send timeout."""
    async with hostile_server(
        send_timeout_s=2.0, max_tokens=30_000, stream_buffer_bytes=64 * 1024
    ) as srv:
        request = chat_request("long", max_tokens=30_000)
        sock = await anyio.to_thread.run_sync(never_reading, srv.port, request)
        try:
            await wait_for(lambda: srv.outcomes("openai", "long", "stalled") == 1, within=60)
            await wait_for(lambda: srv.server.engine.status("long") == "idle", within=30)
            await wait_for(lambda: srv.stats.open == 0, within=10)
        finally:
            sock.close()
        generated = srv.server.state.metrics.generated.labels("long")._value.get()
        assert generated < 30_000  # cancelled, not run to its end
        record(f"{FILE}: streams cancelled at their buffer bound", 1)


# ---- closing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.0", {}), ("1.1", {"connection": "close"})],
    ids=["http1.0", "connection-close"],
)
async def test_a_stream_that_must_close_its_connection_closes_it(
    version: str, headers: dict[str, str]
) -> None:
    """Found: on trio, a streamed response sent with Connection: close never closed the
    socket (curl --http1.0 hung after [DONE]); graceful shutdown waited for it."""
    async with hostile_server() as srv:
        body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        for _ in range(5):
            stream = await srv.connect()
            await stream.send(
                post_request("/v1/chat/completions", body, version=version, **headers)
            )
            answer = await read_until_closed(stream, within=10)
            assert b"data: [DONE]" in answer
        await wait_for(lambda: srv.stats.open == 0, within=10)


async def test_a_half_closed_client_is_sent_no_status_line_of_499() -> None:
    """Found: a client that half-closed its connection read a literal HTTP/1.1 499."""
    async with hostile_server() as srv:
        for stream_mode in (False, True):
            stream = await srv.connect()
            await stream.send(chat_request("slow", stream=stream_mode, max_tokens=100))
            await stream.send_eof()
            answer = await read_until_closed(stream, within=10)
            assert b"499" not in answer.partition(b"\r\n")[0]
            assert not answer.startswith(b"HTTP/1.1 499")
        await wait_for(lambda: srv.server.engine.status("slow") == "idle", within=10)
        assert srv.outcomes("openai", "slow", "disconnected") == 2


async def test_a_stopping_server_ends_each_stream_with_its_dialects_error_event() -> None:
    """Found: on SIGTERM, in-flight streams were cut after the graceful timeout with no
    error event."""
    seen: dict[str, list[str]] = {"openai": [], "anthropic": []}
    bodies = {
        "openai": ("/v1/chat/completions", {"model": "slow", "max_tokens": 250, "stream": True}),
        "anthropic": ("/v1/messages", {"model": "slow", "max_tokens": 250, "stream": True}),
    }

    async def read(url: str, api: str) -> None:
        path, body = bodies[api]
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as h,
            h.stream("POST", path, json=body) as r,
        ):
            try:
                async for line in r.aiter_lines():
                    seen[api].append(line)
            except httpx.RemoteProtocolError:
                seen[api].append("<cut>")

    async with anyio.create_task_group() as tg, hostile_server(graceful_timeout_s=0.3) as srv:
        for api in seen:
            tg.start_soon(read, srv.server.url, api)
        await wait_for(lambda: all(len(v) > 4 for v in seen.values()), within=10)
        # Leaving the block stopped the server: 0.3 s, then each stream's error event.
    assert "server_stopping" in seen["openai"][-2] and seen["openai"][-2].startswith("data: ")
    assert "[DONE]" not in "".join(seen["openai"])
    assert seen["anthropic"][-3] == "event: error" and "overloaded_error" in seen["anthropic"][-2]
    assert "<cut>" not in seen["openai"] + seen["anthropic"]


# ---- the descriptor limit ---------------------------------------------------------------

CONFIG = """
[server]
port = 0
{extra}

[cache]
enabled = false

[models.echo]
backend = "stub"
n_ctx = 256
options = {{ script = "kabo rite" }}
"""


SERVE = [sys.executable, "-m", "erllama.cli", "serve"]
#: Held at once against a server limited to 160 descriptors.
CONNECTIONS = 220


def _limit_fds(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "extra", ["max_connections = 1000", ""], ids=["cap-above-the-limit", "derived-cap"]
)
def test_a_server_at_its_descriptor_limit_logs_once_and_recovers(
    loop: str, extra: str, tmp_path: Path
) -> None:
    """Found: at the descriptor limit asyncio logged a traceback per failed accept (310 MB
    of log in 80 s). Run as ``erllama serve`` with 160 descriptors and 220 connections held
    at once: with a cap above the
    limit, accept() fails and is logged once; with the cap derived from the limit,
    connections beyond it get a 503 and nothing fails."""
    config = tmp_path / "serve.toml"
    config.write_text(CONFIG.format(extra=extra))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1"}
    proc = subprocess.Popen(
        # Access lines (one per answered request, at info) are not what is measured here:
        # the log of the failures themselves is.
        [*SERVE, "--config", str(config), "--loop", loop, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: _limit_fds(160),
    )
    err = bytearray()

    def read() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):  # type: ignore[attr-defined]
            err.extend(chunk)

    drain = threading.Thread(target=read, daemon=True)
    drain.start()
    held: list[socket.socket] = []
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            text = bytes(err).decode(errors="replace")
            if "listening on http://" in text:
                url = text.split("listening on ", 1)[1].split()[0]
        assert url is not None, bytes(err).decode(errors="replace")
        port = int(url.rsplit(":", 1)[1])
        for _ in range(CONNECTIONS):
            # Past the descriptor limit the server stops accepting for a moment and
            # connections wait in its listen backlog (128): they still connect.
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            held.append(sock)
        # The server meets its limit, again and again; whatever it answers within 3 s.
        answers: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 3.0
        while len(answers) < len(held) and time.monotonic() < deadline:
            waiting = [s for s in held if s not in answers]
            ready, _, _ = select.select(waiting, [], [], 0.1)
            for sock in ready:
                try:
                    answers[sock] = sock.recv(12)
                except OSError:
                    answers[sock] = b""
        statuses = [answers.get(sock, b"") for sock in held]
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(1.0)
        with httpx.Client(base_url=url, timeout=10) as h:
            assert h.get("/health").status_code == 200
        served = sum(s.startswith(b"HTTP/1.1 200") for s in statuses)
        refused = sum(s.startswith(b"HTTP/1.1 503") for s in statuses)
        assert served > 0
        if not extra:
            assert refused > 0  # the derived cap answered the rest
        record(f"{FILE}: at the descriptor limit, answered 200", served)
        record(f"{FILE}: at the descriptor limit, answered 503", refused)
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        status = proc.wait(timeout=30)
        drain.join(timeout=10)
    log = bytes(err).decode(errors="replace")
    assert status == 0, log[-2000:]
    assert len(err) < 20_000, f"{len(err)} bytes of log"
    record(f"{FILE}: at the descriptor limit, bytes of log", len(err))
    assert "Traceback" not in log
    if extra:
        assert "cannot accept connections" in log
    record(f"{FILE}: connections at the descriptor limit", CONNECTIONS)
