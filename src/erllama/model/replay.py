"""Replies a model generated, remembered so a replayed history re-tokenizes to them exactly.

An agent sends its history back each turn; the model's earlier replies come back as text.
Tokenizing that text need not give the tokens the model generated (a grammar, or sampling,
can pick tokens the tokenizer would not), and clients rarely send the reply back as it was:
they drop the reasoning, trim whitespace, and never see the stop string that ended it. Then
the prompt stops matching the cached KV right there, and everything after is prefilled again.

So each finished reply is remembered with its token ids under its *replay key*: its text
with thinking spans dropped and outer whitespace stripped, which is what those clients'
versions of it have in common (the text without its stop string is a second key). An
assistant message whose content has a remembered key is rendered as the reply the model
produced, and the chat template splices that reply's ids in where its text appears.

Memory is bounded (least recently used dropped first) and, when the cache has file tiers,
backed by records beside the rows (:mod:`erllama.cache.records`): a restart, or another
replica sharing the cache directory, still replays the replies exactly.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from ..cache.records import RecordStore

__all__ = ["Remembered", "ReplayMemory", "ReplyRecords", "replay_key"]

_U32: Final = struct.Struct("<I")


def replay_key(text: str, thinking: tuple[str, str] | None) -> str:
    """What every version of a reply a client may send back has in common: the text with
    its thinking spans dropped (an unclosed one runs to the end; a closing marker with no
    opening one ends a span the generation prompt opened) and outer whitespace stripped."""
    if thinking is not None:
        start, end = thinking
        close = text.find(end)
        opening = text.find(start)
        if close >= 0 and (opening < 0 or close < opening):
            text = text[close + len(end) :]
        while (opening := text.find(start)) >= 0:
            close = text.find(end, opening + len(start))
            text = text[:opening] if close < 0 else text[:opening] + text[close + len(end) :]
    return text.strip()


@attrs.frozen
class Remembered:
    """A reply as the model produced it: its exact text and token ids."""

    text: str
    ids: tuple[int, ...]

    def encode(self) -> bytes:
        return (
            _U32.pack(len(self.ids))
            + struct.pack(f"<{len(self.ids)}I", *self.ids)
            + self.text.encode("utf-8")
        )

    @classmethod
    def decode(cls, raw: bytes) -> Remembered | None:
        try:
            (n,) = _U32.unpack_from(raw)
            ids = struct.unpack_from(f"<{n}I", raw, _U32.size)
            text = raw[_U32.size + 4 * n :].decode("utf-8")
        except (struct.error, UnicodeDecodeError):
            return None
        return cls(text, ids) if ids and text else None


class ReplayMemory:
    """Replay key -> the reply it came from, least recently used dropped past
    ``entries``. Event loop only."""

    def __init__(self, entries: int = 256, longest: int = 64 * 1024) -> None:
        self._entries = entries
        self._longest = longest
        self._replies: OrderedDict[str, Remembered] = OrderedDict()
        #: The model's thinking markers (set once its template is known).
        self.thinking: tuple[str, str] | None = None
        #: Where replies outlive the process (file tiers); its I/O runs off the loop.
        self.backing: ReplyRecords | None = None

    def __len__(self) -> int:
        return len(self._replies)

    def remember(
        self, text: str, ids: Sequence[int], stop: str | None = None
    ) -> list[tuple[str, Remembered]]:
        """Remember a finished reply (``stop``: the stop string that ended it, part of
        ``text``); returns the keys it is now known by, for a backing store."""
        if not text or not ids or len(text) > self._longest:
            return []
        reply = Remembered(text, tuple(ids))
        versions = [text]
        if stop and text.endswith(stop):
            versions.append(text[: -len(stop)])
        learned = []
        for key in dict.fromkeys(replay_key(v, self.thinking) for v in versions):
            # An empty key would claim every empty assistant message (a tool call's).
            if key:
                self.learn(key, reply)
                learned.append((key, reply))
        return learned

    def learn(self, key: str, reply: Remembered) -> None:
        self._replies[key] = reply
        self._replies.move_to_end(key)
        while len(self._replies) > self._entries:
            self._replies.popitem(last=False)

    def unknown(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """The replay keys of ``messages``' assistant contents not in memory."""
        return [
            key for key in dict.fromkeys(self._keys(messages)) if key and key not in self._replies
        ]

    def resolve(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[Mapping[str, Any]], list[tuple[str, tuple[int, ...]]]]:
        """``messages`` with each remembered reply's content as the model produced it, and
        those replies' ``(text, ids)`` in order (the template's verbatim spans)."""
        out: list[Mapping[str, Any]] = []
        verbatim = []
        for m, key in zip(messages, self._keys(messages), strict=True):
            reply = self._replies.get(key) if key else None
            if reply is None:
                out.append(m)
                continue
            self._replies.move_to_end(key)
            out.append(m if m["content"] == reply.text else {**m, "content": reply.text})
            verbatim.append((reply.text, reply.ids))
        return out, verbatim

    def _keys(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        keys = []
        for m in messages:
            content = m.get("content")
            assistant = m.get("role") == "assistant" and isinstance(content, str)
            if assistant and len(content) <= self._longest:  # type: ignore[arg-type]
                keys.append(replay_key(content, self.thinking))  # type: ignore[arg-type]
            else:
                keys.append("")
        return keys


@attrs.frozen
class ReplyRecords:
    """A model's remembered replies in the cache's record store, under its fingerprint
    (token ids mean nothing to another vocabulary). Blocking I/O: worker threads only."""

    store: RecordStore
    fingerprint: bytes

    def _key(self, key: str) -> bytes:
        return self.fingerprint + key.encode("utf-8")

    def put(self, learned: Sequence[tuple[str, Remembered]]) -> None:
        for key, reply in learned:
            self.store.put(self._key(key), reply.encode())

    def get(self, keys: Sequence[str]) -> list[tuple[str, Remembered]]:
        found = []
        for key in keys:
            raw = self.store.get(self._key(key))
            reply = Remembered.decode(raw) if raw is not None else None
            if reply is not None:
                found.append((key, reply))
        return found
