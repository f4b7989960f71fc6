"""Replies a model generated, remembered so a replayed history re-tokenizes to them exactly.

An agent sends its history back each turn; the model's earlier replies (tool calls above
all) come back as text. Tokenizing that text need not give the tokens the model generated
(a grammar, or sampling, can pick tokens the tokenizer would not), and then the prompt stops
matching the cached KV right there. So each finished reply's exact text is kept with its
token ids, and the chat template splices those ids back in where the text reappears.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ReplayMemory"]


class ReplayMemory:
    """Reply text -> its token ids, least recently used dropped past ``entries``. Event loop
    only."""

    def __init__(self, entries: int = 256, longest: int = 64 * 1024) -> None:
        self._entries = entries
        self._longest = longest
        self._replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def remember(self, text: str, ids: Sequence[int]) -> None:
        if not text or not ids or len(text) > self._longest:
            return
        self._replies[text] = tuple(ids)
        self._replies.move_to_end(text)
        while len(self._replies) > self._entries:
            self._replies.popitem(last=False)

    def for_messages(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> list[tuple[str, tuple[int, ...]]]:
        """The remembered replies among ``messages``' assistant contents, in order."""
        out = []
        for m in messages:
            content = m.get("content")
            if m.get("role") == "assistant" and isinstance(content, str):
                ids = self._replies.get(content)
                if ids is not None:
                    self._replies.move_to_end(content)
                    out.append((content, ids))
        return out
