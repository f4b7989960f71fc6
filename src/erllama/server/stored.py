"""Stored Responses-API responses: what ``previous_response_id``, ``GET`` and ``DELETE
/v1/responses/{id}`` find.

Each stored response keeps the exact token ids in its sequence's KV at the end (its
prompt, its reply, the end-of-generation token), so a chained request continues from those
tokens rather than from a re-rendered history (see chaining.py), and the conversation's
messages, so a request that cannot continue them token for token (another model, other
instructions or tools) can still be rendered whole.

At most ``entries`` responses are kept, least recently used dropped first. With a
directory (the cache's ``disk_dir``, under ``responses/``) each one is also a file there,
so a restart keeps them; the same rules as the cache's row files keep it safe:

- every operation is relative to the directory's fd, opened once with O_NOFOLLOW, and
  files are opened with O_NOFOLLOW (a planted symlink is never followed);
- a file is written to a fresh temp beside its final name (O_EXCL), fsynced, then linked
  to the final name (create-if-absent) and the directory fsynced: a crash leaves at worst a
  stale temp, never a partial response;
- a file is checked when read (its header, the SHA-256 of its body, the record's shape and
  id): a damaged one is a miss, and is removed;
- ids are checked against their exact pattern before they come near a path.

Files live as long as their entry: dropping one from the LRU deletes its file, and at
start the newest ``entries`` files are kept. Event loop only; file work runs in a worker
thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

__all__ = ["ResponseStore", "StoredResponse", "new_response_id", "valid_response_id"]

log = logging.getLogger("erllama.server")

_ID: Final = re.compile(r"resp_[0-9a-f]{48}")
_FILE: Final = re.compile(r"(resp_[0-9a-f]{48})\.json")
_TMP_SUFFIX: Final = ".tmp"
_MAGIC: Final = b"erllama-response 1 "
#: A temp this old belongs to a writer that died (a live write takes milliseconds).
_STALE_TMP_S: Final = 3600.0
#: The largest file read back (a response's context is at most a model's n_ctx tokens).
_LONGEST_FILE: Final = 64 * 1024 * 1024


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def valid_response_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def _str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


@attrs.frozen(kw_only=True)
class StoredResponse:
    """One finished response, as kept for its id."""

    id: str
    model: str
    #: The response object as it was served (``GET /v1/responses/{id}`` returns it).
    response: Mapping[str, Any]
    #: The request's input items, normalised, each with an id (``input_items``).
    input_items: Sequence[Mapping[str, Any]]
    #: The whole conversation as chat-template messages, this response's reply (its exact
    #: text) included: what a request that cannot continue ``context`` renders.
    messages: Sequence[Mapping[str, str]]
    instructions: str | None
    #: The tool specs the prompt was rendered with (None: no tools).
    tools: Sequence[Mapping[str, Any]] | None
    #: The token ids in the sequence's KV at the end (``Done.context``).
    context: Sequence[int]
    finish_key: str | None
    #: The model's effective fingerprint (weights and adapters) when it ran: ``context``
    #: is continued only on the same one.
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "response": self.response,
            "input_items": list(self.input_items),
            "messages": list(self.messages),
            "instructions": self.instructions,
            "tools": list(self.tools) if self.tools is not None else None,
            "context": list(self.context),
            "finish_key": self.finish_key,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: Any) -> StoredResponse:
        """The record a file held; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        ok = (
            isinstance(data.get("id"), str)
            and valid_response_id(data["id"])
            and isinstance(data.get("model"), str)
            and isinstance(data.get("response"), dict)
            and isinstance(data.get("input_items"), list)
            and all(isinstance(i, dict) for i in data["input_items"])
            and isinstance(data.get("messages"), list)
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in data["messages"]
            )
            and _str_or_none(data.get("instructions"))
            and (data.get("tools") is None or isinstance(data["tools"], list))
            and isinstance(data.get("context"), list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in data["context"])
            and _str_or_none(data.get("finish_key"))
            and _str_or_none(data.get("fingerprint"))
        )
        if not ok:
            raise ValueError("not a stored response")
        return cls(
            id=data["id"],
            model=data["model"],
            response=data["response"],
            input_items=data["input_items"],
            messages=data["messages"],
            instructions=data.get("instructions"),
            tools=data.get("tools"),
            context=tuple(data["context"]),
            finish_key=data.get("finish_key"),
            fingerprint=data.get("fingerprint"),
        )


def encode(record: StoredResponse) -> bytes:
    """``erllama-response 1 <sha256 of body>\\n`` then the body (the record as JSON)."""
    body = json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
    return _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode(raw: bytes, expected_id: str) -> StoredResponse:
    """The record in a file's bytes; ValueError when they are damaged or not its id's."""
    head, sep, body = raw.partition(b"\n")
    if not sep or not head.startswith(_MAGIC):
        raise ValueError("no header")
    if head[len(_MAGIC) :].decode("ascii", "replace") != hashlib.sha256(body).hexdigest():
        raise ValueError("checksum mismatch")
    try:
        record = StoredResponse.from_json(json.loads(body))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if record.id != expected_id:
        raise ValueError("another response's file")
    return record


class _Directory:
    """The files, one per response, in one directory (blocking calls: run in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        if self._fd is not None:
            return
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise OSError(f"{self.path} is owned by uid {st.st_uid}, not us")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # responses hold prompts
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def fd(self) -> int:
        assert self._fd is not None, "open() first"
        return self._fd

    def scan(self) -> list[str]:
        """The ids of the files here, oldest first; stale temps are removed."""
        now = time.time()
        found: list[tuple[float, str]] = []
        with os.scandir(self.fd) as it:
            entries = list(it)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.name.endswith(_TMP_SUFFIX):
                if now - st.st_mtime > _STALE_TMP_S:
                    self.unlink(e.name)
                continue
            m = _FILE.fullmatch(e.name)
            if m is not None:
                found.append((st.st_mtime, m.group(1)))
        found.sort()
        return [i for _, i in found]

    def write(self, record: StoredResponse) -> None:
        final = record.id + ".json"
        tmp = f"{final}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            try:
                data = memoryview(encode(record))
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)  # durable before it is visible under its final name
            finally:
                os.close(fd)
            # link(2): create-if-absent, atomic. Ids are random, so a file already there
            # is a stale one of the same id: replace it.
            try:
                os.link(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            except FileExistsError:
                self.unlink(final)
                os.link(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            os.fsync(self.fd)
        finally:
            self.unlink(tmp)

    def read(self, response_id: str) -> StoredResponse | None:
        """The record, or None when there is no file or a damaged one (then removed)."""
        name = response_id + ".json"
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP: a symlink planted at the name
            self.unlink(name)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _LONGEST_FILE:
                raise ValueError("not a response file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                raw = fh.read()
            return decode(raw, response_id)
        except ValueError as exc:
            log.warning("stored response %s is damaged (%s); removed", response_id, exc)
            self.unlink(name)
            return None
        finally:
            os.close(fd)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(name, dir_fd=self.fd)


class ResponseStore:
    """Response id -> :class:`StoredResponse`, at most ``entries``, least recently used
    dropped first; with ``directory``, also a file each there (kept across restarts).

    A failing disk never fails a request: a write that fails is logged and the response
    stays in memory only; a read that fails is a miss.
    """

    def __init__(self, entries: int, directory: Path | None = None) -> None:
        self._entries = entries
        self._dir = _Directory(directory) if directory is not None else None
        #: id -> the record, or None for one known to be on disk but not read yet.
        self._index: OrderedDict[str, StoredResponse | None] = OrderedDict()
        self._opened = False
        self._lock = anyio.Lock()

    @property
    def directory(self) -> Path | None:
        return self._dir.path if self._dir is not None else None

    def __len__(self) -> int:
        return len(self._index)

    async def _open(self) -> None:
        """Open the directory and index its files (once; a failure leaves it off)."""
        if self._opened:
            return
        self._opened = True
        if self._dir is None:
            return
        directory = self._dir

        def scan() -> list[str]:
            directory.open()
            return directory.scan()

        try:
            ids = await anyio.to_thread.run_sync(scan)
        except OSError as exc:
            log.error(
                "stored responses: %s is unusable (%s); keeping them in memory", directory.path, exc
            )
            directory.close()
            self._dir = None
            return
        # Responses put while the scan ran are newer than every file found: they stay last.
        newer = self._index
        self._index = OrderedDict((i, None) for i in ids if i not in newer)
        self._index.update(newer)
        await self._trim()

    async def _disk(self, work: Any, *args: Any) -> Any:
        """Run a file operation in a thread, one at a time; None when it fails."""
        if self._dir is None:
            return None
        try:
            async with self._lock:
                return await anyio.to_thread.run_sync(work, *args)
        except OSError as exc:
            log.error("stored responses: %s", exc)
            return None

    async def _trim(self) -> None:
        while len(self._index) > self._entries:
            old, _ = self._index.popitem(last=False)
            if self._dir is not None:
                await self._disk(self._dir.unlink, old + ".json")

    async def put(self, record: StoredResponse) -> None:
        await self._open()
        if self._entries == 0:
            return
        self._index[record.id] = record
        self._index.move_to_end(record.id)
        if self._dir is not None:
            await self._disk(self._dir.write, record)
        await self._trim()

    async def get(self, response_id: str) -> StoredResponse | None:
        """The response, or None (unknown, forgotten, damaged, or not an id at all)."""
        if not valid_response_id(response_id):
            return None
        await self._open()
        record = self._index.get(response_id)
        if record is None and self._dir is not None:
            # Not read yet, or written by another server sharing the directory.
            record = await self._disk(self._dir.read, response_id)
            if record is None:
                self._index.pop(response_id, None)
                return None
            self._index[response_id] = record
            await self._trim()
        if record is not None and response_id in self._index:
            self._index.move_to_end(response_id)
        return record

    async def delete(self, response_id: str) -> bool:
        """Forget a response; False when it was not there."""
        found = await self.get(response_id)
        if found is None:
            return False
        self._index.pop(response_id, None)
        if self._dir is not None:
            await self._disk(self._dir.unlink, response_id + ".json")
        return True

    def close(self) -> None:
        if self._dir is not None:
            self._dir.close()
