"""A spy plugin: the llama_cpp backend, registered under another name, recording the shape
of every step (which sequences decode, which prefill how many tokens). It only watches; the
tokens still come from the llama_cpp plugin."""

from __future__ import annotations

from typing import Any

import erllama
from erllama.backends import Decode, Prefill
from erllama.backends import llama_cpp as llama_plugin

#: One op as recorded: ("decode", seq, (), False) or ("prefill", seq, tokens, logits).
Op = tuple[str, int, tuple[int, ...], bool]


class RecordingLlama:
    """``steps``: one list of ops per ``step`` call, in the order they were passed."""

    def __init__(self) -> None:
        self.steps: list[list[Op]] = []
        for name in dir(llama_plugin):
            fn = getattr(llama_plugin, name)
            if callable(fn) and hasattr(fn, "erllama_impl") and name != "step":
                setattr(self, name, fn)

    @erllama.backends.hookimpl
    def step(self, model: Any, ops: Any, on_sampled: Any) -> Any:
        shape: list[Op] = []
        for op in ops:
            if isinstance(op, Decode):
                shape.append(("decode", op.seq, (), False))
            else:
                assert isinstance(op, Prefill)
                shape.append(("prefill", op.seq, tuple(op.tokens), op.logits))
        self.steps.append(shape)
        return llama_plugin.step(model, ops, on_sampled)

    def registry(self) -> Any:
        return erllama.make_backend_registry({"spy": self}, autoload=False)

    def most_decoding(self) -> int:
        """The most sequences that decoded together in one step."""
        return max((sum(op[0] == "decode" for op in s) for s in self.steps), default=0)
