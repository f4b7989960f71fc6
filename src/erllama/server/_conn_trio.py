"""One connection on trio: Hypercorn's ``TCPServer`` with erllama's limits.

See :mod:`.transport` for why. The overrides of :mod:`._conn_asyncio`, plus:

* ``protocol_send`` keeps Hypercorn's shield around a write (a write cut midway would
  corrupt the stream) but bounds it by ``send_timeout_s`` inside the shield;
* closing is shielded: Hypercorn's ``_close`` sends EOF at a checkpoint before it closes
  the socket, and when it runs inside the app's own send (a response that must close the
  connection) the app's disconnect listener may cancel it there, leaving the socket open
  forever (``curl --http1.0`` hung after ``[DONE]``).
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .transport import Limits, TransportStats

__all__ = ["serve_socket"]


class Connection(TCPServer):
    def __init__(self, *args: Any, limits: Limits, stats: TransportStats) -> None:
        super().__init__(*args)
        self.limits = limits
        self.stats = stats
        self.idle = True
        self.served = False
        self.head_started = False
        #: The client's side ended (EOF or an error reading): nothing more will arrive.
        self.ended = False

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            async with self.send_lock:
                with trio.CancelScope(shield=True):
                    try:
                        with trio.move_on_after(self.limits.send_timeout_s) as timer:
                            await self.stream.send_all(event.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.protocol.handle(Closed())
                        return
                    if timer.cancelled_caught:
                        self.stats.send_timeouts += 1
                        await self.stream.aclose()
                        await self.protocol.handle(Closed())
            return
        if isinstance(event, Closed):
            with trio.CancelScope(shield=True):
                await self._close()
                await self.protocol.handle(Closed())
            return
        if isinstance(event, Updated):
            self.idle = event.idle
            if event.idle:
                if self.ended:  # no next request can come: close instead of waiting
                    await self._close_ended()
                    return
                self.served = True
                self.head_started = False
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                data = b""  # a reset ends the client's side as EOF does (h11 must know)
            if data and self.idle and not self.head_started:
                self.head_started = True
                await self.idle_task.restart(self._task_group, self._idle_timeout)
            if not data:
                self.ended = True
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())
        if self.idle:
            await self.idle_task.stop()

    async def _close_ended(self) -> None:
        await self.idle_task.stop()
        with trio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            await super()._close()

    async def _idle_timeout(self) -> None:
        heading = self.head_started or not self.served
        timeout = self.limits.header_timeout_s if heading else self.limits.keep_alive_s
        with trio.move_on_after(timeout) as timer:
            await self.context.terminated.wait()
        if timer.cancelled_caught and heading:
            self.stats.header_timeouts += 1
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


async def serve_socket(
    app: Any,
    config: Config,
    context: Any,
    limits: Limits,
    stats: TransportStats,
    sock: socket.socket,
) -> None:
    """Serve ``sock`` (accepted, non-blocking) until the connection ends; closes it."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await Connection(app, config, context, {}, stream, limits=limits, stats=stats)
