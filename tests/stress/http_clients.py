"""Hostile HTTP clients for the stress files, and what they measure on the server.

The servers under test are real (Hypercorn on a loopback port, in the test's own loop:
asyncio and trio); the clients speak raw TCP where an HTTP library would be too polite
(never reading, half-closing, trickling headers) and httpx otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

import erllama
from erllama.backends import stub
from erllama.plugins import BackendRegistry

from ..server.conftest import Server, running_server, serve_config

__all__ = [
    "HOST",
    "chat_request",
    "fds",
    "hostile_server",
    "never_reading",
    "post_request",
    "read_until_closed",
    "rss_mib",
]

HOST = "localhost"


def fds() -> int:
    """Descriptors this process holds (the server runs in it)."""
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def post_request(path: str, body: dict[str, Any], *, version: str = "1.1", **headers: str) -> bytes:
    raw = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/{version}", f"Host: {HOST}", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def chat_request(model: str, *, stream: bool = True, max_tokens: int = 64, **headers: str) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "max_tokens": max_tokens,
    }
    return post_request("/v1/chat/completions", body, **headers)


async def read_until_closed(stream: anyio.abc.ByteStream, within: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails after
    ``within`` seconds: a server that never closes is the bug)."""
    out = bytearray()
    with anyio.fail_after(within):
        while True:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return bytes(out)


def never_reading(port: int, request: bytes) -> socket.socket:
    """A connected socket that sent ``request`` and will never read: a 4 KiB receive
    buffer, fixed before connecting (so the kernel does not grow it), fills at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that gives up mid-response does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@attrs.frozen
class Hostile:
    server: Server

    @property
    def port(self) -> int:
        return self.server.running.port

    @property
    def stats(self) -> Any:
        return self.server.state.transport

    def outcomes(self, api: str, model: str, outcome: str) -> float:
        metric = self.server.state.metrics.requests.labels(api, model, outcome)
        return float(metric._value.get())

    async def connect(self) -> anyio.abc.SocketStream:
        assert self.server.url  # on the server's loop
        return await anyio.connect_tcp("127.0.0.1", self.port)


def models(**extra: erllama.ModelConfig) -> dict[str, erllama.ModelConfig]:
    from ..helpers import stub_config

    out = {
        "plain": stub_config(script="kabo rite sanu mila tove"),
        "slow": stub_config(step_delay_s=0.05, n_seq_max=4),
        # Generates until max_tokens: a never-reading client's stream outgrows every buffer.
        "long": stub_config(eog_every=0, n_ctx=40_000, n_seq_max=4),
    }
    out.update(extra)
    return out


@asynccontextmanager
async def hostile_server(
    registry: BackendRegistry | None = None, cache: bool = False, **server: Any
) -> AsyncIterator[Hostile]:
    """A server of stub models (``plain``, ``slow``, ``long``) with ``server`` settings."""
    registry = registry or erllama.make_backend_registry({"stub": stub}, autoload=False)
    server.setdefault("admin", False)  # the default: only tests of the admin routes want them
    config = serve_config(**server)
    config = attrs.evolve(config, models={**config.models, **models()})
    if cache:
        config = attrs.evolve(config, cache=erllama.CacheConfig(ram_file_dir=None))
    async with running_server(config, registry) as srv:
        yield Hostile(srv)


linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
