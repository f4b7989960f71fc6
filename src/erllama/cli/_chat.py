"""``erllama chat``: a conversation on stdin, with Ctrl-C handled the way a chat expects.

Ctrl-C during a reply stops that reply (its request is cancelled in the engine) and returns
to the prompt; Ctrl-C at the prompt ends the chat with status 130. Both come from one
SIGINT receiver in the chat loop, so neither is a KeyboardInterrupt landing somewhere in
the event loop, on asyncio or on trio.

Lines are read from stdin on the event loop (wait until readable, then read), not with
``input()`` in a worker thread: a thread blocked in ``input()`` cannot be stopped, so the
process could not exit until the user pressed Enter.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from ..config import CacheConfig, EngineConfig
from ..engine import Engine, open_engine
from ._common import load, ms, sampler_args, stream_reply
from ._console import Console

__all__ = ["chat", "chat_cache_config"]

#: Exit status of a program ended by SIGINT (128 + 2), as shells report it.
INTERRUPTED = 130


def chat_cache_config(cache_dir: Path | None) -> CacheConfig:
    """The chat's cache: in process memory only unless ``--cache-dir`` is given.

    The /dev/shm tier is off either way. Without a directory it would leave rows behind
    after the chat ends; with one, rows leaving RAM must spill to that directory, and with
    a /dev/shm tier on they would spill there instead."""
    return CacheConfig(ram_file_dir=None, disk_dir=cache_dir)


class _Lines:
    """Lines of a file descriptor, read without a thread. Waiting is a cancellable
    checkpoint; a regular file (stdin redirected from one) is never waited on, since
    readiness polling does not apply to it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        #: A terminal echoes the line typed, Enter included.
        self.echoed = os.isatty(fd)
        self._buf = bytearray()
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its line ending, or None at end of input."""
        while b"\n" not in self._buf and not self._eof:
            if not self._regular:
                await anyio.wait_readable(self._fd)
            chunk = os.read(self._fd, 65536)
            self._eof = not chunk
            self._buf += chunk
        if not self._buf:
            return None
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode("utf-8", errors="replace").rstrip("\r")


class _Chat:
    def __init__(
        self, engine: Engine, mid: str, args: argparse.Namespace, console: Console
    ) -> None:
        self.engine = engine
        self.mid = mid
        self.args = args
        self.console = console
        self.history: list[dict[str, str]] = []
        #: The running turn's scope: a Ctrl-C cancels it. None while at the prompt.
        self.turn: anyio.CancelScope | None = None
        self.status = 0

    async def run(self, lines: _Lines) -> int:
        with anyio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._on_interrupt, interrupts, tg.cancel_scope)
                await self._converse(lines)
                tg.cancel_scope.cancel()
        return self.status

    async def _on_interrupt(
        self, interrupts: AsyncIterator[signal.Signals], chat: anyio.CancelScope
    ) -> None:
        async for _ in interrupts:
            if self.turn is not None:
                self.turn.cancel()
            else:
                self.status = INTERRUPTED
                chat.cancel()
                return

    async def _converse(self, lines: _Lines) -> None:
        err = self.console.err
        err.line("chat with the model; an empty line or Ctrl-D ends, Ctrl-C stops a reply.")
        while True:
            err.write("> ")
            line = await lines.readline()
            if line is None:  # Ctrl-D: the terminal echoed nothing, so end the prompt's line
                err.end_line()
                return
            if lines.echoed:
                err.line_ended_elsewhere()
            else:
                err.end_line()  # keep a piped transcript one line per message
            if not line.strip():
                return
            with anyio.CancelScope() as self.turn:
                await self._reply(line.strip())
            self.turn = None

    async def _reply(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        try:
            prompt = await self.engine.apply_chat_template(
                self.mid, self.history, system=self.args.system
            )
            reply, done = await stream_reply(
                self.engine, self.mid, prompt, self.console, **sampler_args(self.args)
            )
        except anyio.get_cancelled_exc_class():
            # Ctrl-C: forget the turn, so the next one is asked as if it never happened.
            self.history.pop()
            self.console.note("[reply stopped]")
            raise
        st = done.stats
        self.console.note(
            f"[ttft {ms(st.time_to_first_token_s)}, cache {st.cache_hit_kind}, "
            f"{st.cache_delta.read} tokens restored]"
        )
        self.history.append({"role": "assistant", "content": reply.strip()})


async def chat(args: argparse.Namespace, console: Console) -> int:
    config = EngineConfig(cache=chat_cache_config(args.cache_dir))
    lines = _Lines(sys.stdin.fileno())
    async with open_engine(config) as engine:
        mid = await load(engine, args, progress=console.interactive)
        return await _Chat(engine, mid, args, console).run(lines)
