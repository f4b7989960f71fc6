"""One connection on asyncio: Hypercorn's ``TCPServer`` with erllama's limits.

See :mod:`.transport` for why. Overrides, each kept as close to Hypercorn 0.18's code as
the fix allows:

* ``_read_data``: the first byte of a request while idle starts the header timer; when the
  client closes, an idle connection stops its timer (else the task group, and the
  connection, wait for the keep-alive timeout);
* ``_idle_timeout``: a connection that has not completed a request, or has begun a new one,
  gets ``header_timeout_s``; an idle one between requests ``keep_alive_s``;
* ``protocol_send``: a write waits at most ``send_timeout_s`` for the client to read, then
  the connection is aborted (its request then sees the disconnect and is cancelled).
"""

from __future__ import annotations

import asyncio
import socket
from ssl import SSLError
from typing import Any

from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated

from .transport import Limits, TransportStats

__all__ = ["serve_socket"]


class Connection(TCPServer):
    def __init__(self, *args: Any, limits: Limits, stats: TransportStats) -> None:
        super().__init__(*args)
        self.limits = limits
        self.stats = stats
        #: No request in progress (Hypercorn's ``Updated`` events say when that changes).
        self.idle = True
        #: A response was completed on this connection: idle time is keep-alive time.
        self.served = False
        #: Bytes of a request arrived while idle: its headers are on the clock.
        self.head_started = False
        #: The client's side ended (EOF or an error reading): nothing more will arrive.
        self.ended = False

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            async with self.send_lock:
                try:
                    self.writer.write(event.data)
                    await asyncio.wait_for(self.writer.drain(), self.limits.send_timeout_s)
                except TimeoutError:
                    self.stats.send_timeouts += 1
                    self.writer.transport.abort()  # drop what the client never read
                    await self.protocol.handle(Closed())
                except (ConnectionError, RuntimeError):
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
        while not self.ended:
            try:
                data = await self.reader.read(MAX_RECV)
            except (ConnectionError, OSError, TimeoutError, SSLError):
                data = b""  # a reset ends the client's side as EOF does (h11 must know)
            if data and self.idle and not self.head_started:
                self.head_started = True
                await self.idle_task.restart(self._task_group, self._idle_timeout)
            if not data:
                self.ended = True
            await self.protocol.handle(RawData(data))
        await self.protocol.handle(Closed())
        if self.idle:
            await self.idle_task.stop()

    async def _close_ended(self) -> None:
        await self.idle_task.stop()
        await self._close()

    async def _idle_timeout(self) -> None:
        heading = self.head_started or not self.served
        timeout = self.limits.header_timeout_s if heading else self.limits.keep_alive_s
        try:
            await asyncio.wait_for(self.context.terminated.wait(), timeout)
        except TimeoutError:
            if heading:
                self.stats.header_timeouts += 1
        await asyncio.shield(self._initiate_server_close())


async def serve_socket(
    app: Any,
    config: Config,
    context: Any,
    limits: Limits,
    stats: TransportStats,
    sock: socket.socket,
) -> None:
    """Serve ``sock`` (accepted, non-blocking) until the connection ends; closes it."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=sock)
    await Connection(app, loop, config, context, {}, reader, writer, limits=limits, stats=stats)
