"""Request hygiene in front of every route: what a web page, a slow client or a vanished
one can make the server do. ASGI middleware, so every route (those added later too) gets
it; it runs before the API-key check (:mod:`.auth`).

* **Request id.** Every response carries ``x-request-id``; a 5xx names it in its message
  and the log line with its cause names it too.
* **Host.** A server on a loopback address answers only ``localhost``, ``127.0.0.1`` and
  ``[::1]`` (or ``server.allowed_hosts``): a web page that rebinds its own DNS name to
  127.0.0.1 sends its own name as ``Host`` and is refused, as Ollama does since
  CVE-2024-28224.
* **Origin.** A request carrying ``Origin`` (a browser's cross-site request) is refused
  unless ``server.cors_origins`` allows it.
* **Content type.** A body must be declared ``application/json``. A web page may send
  ``text/plain`` to any site without a CORS preflight (a "simple" request), never
  ``application/json``: so a page cannot drive a keyless server (CSRF) by posting JSON
  disguised as text.
* **Body.** Read here whole, capped (413 beyond ``max_body_bytes``) and on a deadline (408
  after ``body_timeout_s``), then handed to the route.
* **Disconnect.** Once the body is read, a client that goes away cancels the route's work
  wherever it is (rendering a chat template, waiting for a model, generating), not only
  in the places that listen for it. Nothing is sent to a client that is gone.
* ``erllama_http_requests_total{route, status}`` counts every answer, and the
  ``erllama.server.access`` logger writes a line for it (499: the client left first).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import route_label
from .errors import ApiError, dialect_of, error_response
from .state import ServerState

__all__ = ["DRAIN_CAP", "Guard", "request_id"]

log = logging.getLogger("erllama.server")
#: One line per request answered (INFO): client, method, path, status, seconds, request id.
access_log = logging.getLogger("erllama.server.access")

#: A body longer than this is refused without reading it to the end (the connection may
#: then be reset); shorter oversize bodies are read and dropped so the client gets the 413.
DRAIN_CAP = 64 * 1024 * 1024
#: Host names a loopback server answers when ``server.allowed_hosts`` is empty.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_id(scope: Scope) -> str | None:
    """The id the guard gave this request (None outside the guard)."""
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class _Refused(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


class _Gone(Exception):
    """The client disconnected before its body was read."""


class Guard:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        server = state.config.server
        self.allowed_hosts: frozenset[str] | None
        if "*" in server.allowed_hosts:
            self.allowed_hosts = None
        elif server.allowed_hosts:
            self.allowed_hosts = frozenset(host_name(h) for h in server.allowed_hosts)
        elif is_loopback(server.host):
            self.allowed_hosts = LOOPBACK_HOSTS
        else:
            self.allowed_hosts = None
        self.origins = frozenset(server.cors_origins)

    def _check(self, scope: Scope) -> None:
        host = _header(scope, b"host")
        if (
            self.allowed_hosts is not None
            and host is not None
            and host_name(host) not in self.allowed_hosts
        ):
            raise _Refused(
                ApiError(
                    403,
                    "permission",
                    f"host {host!r} is not served here (see server.allowed_hosts)",
                    code="host_not_allowed",
                    retryable=False,
                )
            )
        origin = _header(scope, b"origin")
        if origin is not None and "*" not in self.origins and origin not in self.origins:
            raise _Refused(
                ApiError(
                    403,
                    "permission",
                    f"requests from web origin {origin!r} are not allowed (see "
                    "server.cors_origins)",
                    code="origin_not_allowed",
                    retryable=False,
                )
            )
        if scope["method"] in _BODY_METHODS:
            content_type = _header(scope, b"content-type")
            if content_type is None or not _is_json(content_type):
                raise _Refused(
                    ApiError(
                        415,
                        "invalid_request",
                        "the body must be JSON, sent with 'Content-Type: application/json' "
                        f"(got {content_type!r})",
                        param="content-type",
                        code="unsupported_media_type",
                        retryable=False,
                    )
                )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body within the deadline and the size cap (see read_body for why an
        oversize one is drained before the 413)."""
        limit = self.state.config.server.max_body_bytes
        too_large = ApiError(
            413,
            "too_large",
            f"the request body is larger than {limit} bytes",
            code="request_too_large",
            retryable=False,
        )
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > DRAIN_CAP:
            raise _Refused(too_large)
        buf = bytearray()
        seen = 0
        with anyio.move_on_after(self.state.config.server.body_timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Gone
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen <= limit:
                    buf += chunk
                elif seen > DRAIN_CAP:
                    raise _Refused(too_large)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            self.state.transport.body_timeouts += 1
            raise _Refused(
                ApiError(
                    408,
                    "invalid_request",
                    f"the request body did not arrive within {self.state.config.server.body_timeout_s} s",
                    code="request_timeout",
                    retryable=False,
                )
            )
        if seen > limit:
            raise _Refused(too_large)
        return bytes(buf)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        path: str = scope["path"]
        status = 0
        complete = False
        began = time.monotonic()

        async def guarded_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            try:
                self._check(scope)
                body = await self._read_body(scope, receive)
            except _Refused as refused:
                close = refused.error.status in (408, 413, 415)
                response = error_response(refused.error, dialect_of(path), request_id=rid)
                if close:  # the body was not read: the connection cannot be reused
                    response.headers["connection"] = "close"
                await response(scope, receive, guarded_send)
                return
            except _Gone:
                return
            await self._run(scope, body, receive, guarded_send, lambda: complete)
        finally:
            self.state.metrics.http.labels(route_label(path), str(status or 499)).inc()
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                access_log.info(
                    '%s "%s %s" %d %.3fs %s',
                    client[0],
                    scope["method"],
                    path,
                    status or 499,
                    time.monotonic() - began,
                    rid,
                )

    async def _run(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, complete: object
    ) -> None:
        """Run the route with ``body`` replayed to it; the client's disconnect cancels it
        (routes that listen for the disconnect themselves see it too)."""
        gone = anyio.Event()
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                if not complete():  # type: ignore[operator]
                    work.cancel()

            tg.start_soon(watch)
            with anyio.CancelScope() as work:
                await self.app(scope, replay, send)
            tg.cancel_scope.cancel()
