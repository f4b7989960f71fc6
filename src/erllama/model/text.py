"""Text calls on one model: tokenize, detokenize, the chat template, embeddings.

The first three read only the vocabulary and the template, so they run on worker threads and
never wait for a step: each is a counted native call through the gate (see
:meth:`~erllama.model.gate.ModelGate.native`), so an unload never frees the model under one.
An embedding computes, so it runs on the model thread between steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ..config import ModelConfig
from ..errors import InvalidRequest, NotSupported
from ..plugins import Backend
from ..sampling import SamplerParams
from . import intake
from .gate import ModelGate
from .replay import ReplayMemory

if TYPE_CHECKING:
    from .sides import OnThread

__all__ = ["TextCalls"]


class TextCalls:
    def __init__(
        self, gate: ModelGate, backend: Backend, config: ModelConfig, replies: ReplayMemory
    ) -> None:
        self._gate = gate
        self._backend = backend
        self._config = config
        self._replies = replies

    async def prepare(
        self, text: str | None, add_special: bool, sp: SamplerParams | None, *, held: bool
    ) -> tuple[list[int] | None, Any]:
        """Tokenize a prompt and build its sampler (a counted native call). ``held``: the
        caller holds a use of the gate (see :meth:`ModelGate.check_serving`)."""
        backend = self._backend

        def run(handle: Any) -> tuple[list[int] | None, Any]:
            tokens = None
            if text is not None:
                intake.check_text(text, "prompt")
                tokens = backend.tokenize(handle, text, add_special=add_special)
            sampler = backend.sampler_new(handle, sp) if sp is not None else None
            return tokens, sampler

        return await self._gate.native(run, held=held)

    async def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self._gate.check_serving()
        if not isinstance(text, str):
            raise InvalidRequest("text", "must be a string")
        backend = self._backend

        def run(handle: Any) -> list[int]:
            intake.check_text(text, "text")
            return backend.tokenize(
                handle, text, add_special=add_special, parse_special=parse_special
            )

        return await self._gate.native(run)

    async def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        self._gate.check_serving()
        facts = self._gate.facts
        assert facts is not None
        n_vocab, backend = facts.loaded.n_vocab, self._backend

        def run(handle: Any) -> bytes:
            # Off the loop: a long list costs time proportional to its length.
            ids = intake.check_token_ids(tokens, n_vocab, "tokens")
            return backend.detokenize(handle, ids, special)

        raw: bytes = await self._gate.native(run)
        return raw.decode("utf-8", errors="replace")

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> list[int]:
        self._gate.check_serving()
        self._backend.require("chat_template")
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
        backend = self._backend
        replies = self._replies
        backing = replies.backing
        unknown = replies.unknown(messages) if backing is not None else []
        if unknown:
            assert backing is not None
            # Replies this process never saw (a restart, another replica) from the records.
            for key, reply in await anyio.to_thread.run_sync(backing.get, unknown):
                replies.learn(key, reply)
        messages, verbatim = replies.resolve(messages)

        def run(handle: Any) -> list[int]:
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

        return await self._gate.native(run)

    async def embed(self, prompt: str | Sequence[int]) -> list[float]:
        self._gate.check_serving()
        self._backend.require("embed")
        if not self._config.embeddings:
            raise NotSupported(self._backend.name, "embed", "ModelConfig.embeddings is off")
        facts = self._gate.facts
        assert facts is not None
        n_vocab, n_ctx = facts.loaded.n_vocab, facts.loaded.n_ctx
        # One use from tokenizing to the embedding: an unload begun meanwhile waits for it.
        async with self._gate.using():
            if intake.prompt_kind(prompt) == "text":
                text: str = prompt  # type: ignore[assignment]
                tokens = (await self.prepare(text, True, None, held=True))[0]
                assert tokens is not None
            else:
                ids: Sequence[int] = prompt  # type: ignore[assignment]
                intake.check_prompt_length(len(ids), n_ctx + 1)  # length first, then the ids
                tokens = intake.check_token_ids(ids, n_vocab, "prompt")
            if not tokens:
                raise InvalidRequest("prompt", "is empty")
            backend = self._backend

            def run(t: OnThread) -> list[float]:
                return backend.embed(t.handle, tokens)

            return await self._gate.call(run, held=True)
