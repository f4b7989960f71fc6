"""Text calls on one model: tokenize, detokenize, the chat template, embeddings.

The first three read only the vocabulary and the template, so they run on worker threads and
never wait for a step (see ``ModelWorker.vocab_call``); an embedding computes, so it runs on
the model thread between steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest, NotSupported
from . import intake

if TYPE_CHECKING:
    from .worker import ModelWorker

__all__ = ["TextCalls"]


class TextCalls:
    def __init__(self, worker: ModelWorker) -> None:
        self.w = worker

    async def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.w.check_serving()
        if not isinstance(text, str):
            raise InvalidRequest("text", "must be a string")
        backend, handle = self.w.backend, self.w.thread.handle

        def run() -> list[int]:
            intake.check_text(text, "text")
            return backend.tokenize(
                handle, text, add_special=add_special, parse_special=parse_special
            )

        return await self.w.vocab_call(run)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        self.w.check_serving()
        assert self.w.loaded is not None
        n_vocab, backend, handle = self.w.loaded.n_vocab, self.w.backend, self.w.thread.handle

        def run() -> bytes:
            # Off the loop: a long list costs time proportional to its length.
            return backend.detokenize(handle, intake.check_token_ids(tokens, n_vocab, "tokens"))

        raw: bytes = await self.w.vocab_call(run)
        return raw.decode("utf-8", errors="replace")

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> list[int]:
        self.w.check_serving()
        self.w.backend.require("chat_template")
        given: object = messages
        if not isinstance(given, list | tuple):
            raise InvalidRequest("messages", "must be a list of {'role', 'content'} mappings")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise InvalidRequest(f"messages[{i}]", "needs string 'role' and 'content'")
        if system is not None and not isinstance(system, str):
            raise InvalidRequest("system", "must be a string")
        if tools is not None:
            if not isinstance(tools, list | tuple):
                raise InvalidRequest("tools", "must be a list of tool (function) mappings")
            for i, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise InvalidRequest(f"tools[{i}]", "must be a tool (function) mapping")
        backend, handle = self.w.backend, self.w.thread.handle
        verbatim = self.w.replies.for_messages(messages)

        def run() -> list[int]:
            for i, m in enumerate(messages):
                intake.check_text(m["content"], f"messages[{i}].content")
            if system is not None:
                intake.check_text(system, "system")
            return backend.apply_chat_template(
                handle,
                list(messages),
                system,
                list(tools) if tools is not None else None,
                add_generation_prompt,
                verbatim,
            )

        return await self.w.vocab_call(run)

    async def embed(self, prompt: str | Sequence[int]) -> list[float]:
        self.w.check_serving()
        self.w.backend.require("embed")
        if not self.w.config.embeddings:
            raise NotSupported(self.w.backend.name, "embed", "ModelConfig.embeddings is off")
        assert self.w.loaded is not None
        n_vocab, n_ctx = self.w.loaded.n_vocab, self.w.loaded.n_ctx
        if intake.prompt_kind(prompt) == "text":
            text: str = prompt  # type: ignore[assignment]
            tokens = (await self.w.vocab_call(lambda: self.w.prepare(text, True, None)))[0]
            assert tokens is not None
        else:
            ids: Sequence[int] = prompt  # type: ignore[assignment]
            intake.check_prompt_length(len(ids), n_ctx + 1)  # length first, then the ids
            tokens = await self.w.vocab_call(lambda: intake.check_token_ids(ids, n_vocab, "prompt"))
        if not tokens:
            raise InvalidRequest("prompt", "is empty")
        backend, handle = self.w.backend, self.w.thread.handle

        def run() -> list[float]:
            return backend.embed(handle, tokens)

        return await self.w.call(run)
