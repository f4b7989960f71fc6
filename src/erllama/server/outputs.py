"""A Responses-API reply's output items, and the stream events that build them.

Pieces arrive in the order the model produces them (generation.py); :class:`Output` turns
each into the events that open, fill and close an item, and keeps the finished items for
the response object. Every event here lacks its ``sequence_number``, which the stream
adds; a reply that is not streamed ignores the events and keeps the items.

Item ids are minted here (``msg_``, ``rs_``, ``fc_``): with each call's ``call_id`` they
are the keys the reply's exact text is kept under, so an agent that sends the items back
gets the exact bytes rendered (responses.py).
"""

from __future__ import annotations

import secrets
from typing import Any

from .generation import Call

__all__ = ["Output", "item_id"]


def item_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


class Output:
    """A reply's output items as its pieces arrive, and the stream events that build them
    (events without their sequence numbers; a non-streamed reply ignores them)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.ids: list[str] = []  # every item id and call_id: the reply's exact text's keys
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []

    @property
    def _index(self) -> int:
        return len(self.items)

    def _start(self, kind: str) -> list[dict[str, Any]]:
        out = self.close("completed")
        prefix, part = ("msg_", "output_text") if kind == "message" else ("rs_", "reasoning_text")
        item: dict[str, Any] = {"id": item_id(prefix), "type": kind, "status": "in_progress"}
        if kind == "message":
            item.update(role="assistant", content=[])
        else:
            item.update(summary=[], content=[])
        self._open, self._text = item, []
        self.ids.append(item["id"])
        out.append(
            {"type": "response.output_item.added", "output_index": self._index, "item": item}
        )
        out.append(
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": self._index,
                "content_index": 0,
                "part": self._part(part, ""),
            }
        )
        return out

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "output_text":
            return {"type": kind, "text": text, "annotations": [], "logprobs": []}
        return {"type": kind, "text": text}

    def _delta(self, kind: str, text: str) -> dict[str, Any]:
        assert self._open is not None
        self._text.append(text)
        event = {
            "type": f"response.{kind}.delta",
            "item_id": self._open["id"],
            "output_index": self._index,
            "content_index": 0,
            "delta": text,
        }
        if kind == "output_text":
            event["logprobs"] = []
        return event

    def text(self, text: str) -> list[dict[str, Any]]:
        out = (
            []
            if self._open is not None and self._open["type"] == "message"
            else self._start("message")
        )
        out.append(self._delta("output_text", text))
        return out

    def thinking(self, text: str) -> list[dict[str, Any]]:
        out = (
            []
            if self._open is not None and self._open["type"] == "reasoning"
            else self._start("reasoning")
        )
        out.append(self._delta("reasoning_text", text))
        return out

    def thinking_end(self) -> list[dict[str, Any]]:
        if self._open is not None and self._open["type"] == "reasoning":
            return self.close("completed")
        return []

    def call(self, call: Call) -> list[dict[str, Any]]:
        out = self.close("completed")
        item = {
            "id": item_id("fc_"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
        }
        self.ids += [item["id"], call.id]
        index = self._index
        done = {**item, "arguments": call.arguments_json, "status": "completed"}
        self.items.append(done)
        return [
            *out,
            {"type": "response.output_item.added", "output_index": index, "item": item},
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": index,
                "delta": call.arguments_json,
            },
            {
                "type": "response.function_call_arguments.done",
                "item_id": item["id"],
                "output_index": index,
                "name": call.name,
                "arguments": call.arguments_json,
            },
            {"type": "response.output_item.done", "output_index": index, "item": done},
        ]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Close the open message or reasoning item (``incomplete`` when cut off)."""
        item, self._open = self._open, None
        if item is None:
            return []
        text = "".join(self._text)
        kind = "output_text" if item["type"] == "message" else "reasoning_text"
        done = {**item, "status": status, "content": [self._part(kind, text)]}
        index = self._index
        self.items.append(done)
        base = {"item_id": item["id"], "output_index": index, "content_index": 0}
        text_done: dict[str, Any] = {"type": f"response.{kind}.done", **base, "text": text}
        if kind == "output_text":
            text_done["logprobs"] = []
        return [
            text_done,
            {"type": "response.content_part.done", **base, "part": self._part(kind, text)},
            {"type": "response.output_item.done", "output_index": index, "item": done},
        ]
