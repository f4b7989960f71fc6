"""``backend="llama_cpp"``: llama.cpp through llama-cpp-python's low-level bindings.

Implements every hook: the required ones plus chat template (the GGUF's own Jinja
template), embeddings (a separate context), sampler chains with GBNF grammars, LoRA
adapters and metadata. The work is in :mod:`erllama.backends.llama_native`; this module is
the plugin surface. Needs the ``llama`` extra (``pip install erllama[llama]``).

``ModelConfig.options`` may carry any field of llama.cpp's ``llama_model_params`` or
``llama_context_params`` (``offload_kqv``, ``rope_freq_base``, ``main_gpu`` ...), plus
``progress_callback`` (called with 0..1 while loading), ``embedding_n_ctx`` and
``pooling`` (``mean``, ``last`` or ``cls``) for the embeddings context, and
``compute_thread`` (``shared``: every model's graphs on one thread, see
:mod:`.llama_compute`; ``own``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..config import ModelConfig
from ..sampling import SamplerParams
from .hookspecs import hookimpl
from .llama_native import LlamaModel
from .llama_sampling import Sampler
from .types import ChatMessage, LoadedModel, StepOp, StepResult


@hookimpl
def load(config: ModelConfig) -> LoadedModel:
    model = LlamaModel(config)
    return LoadedModel(
        handle=model,
        n_ctx=model.n_ctx_seq,
        n_vocab=model.n_vocab,
        n_seq_max=model.n_seq,
        quant=model.quant,
        fingerprint=None,  # the engine hashes the GGUF (remembered per path, size, mtime)
        kv_layout=model.kv_layout,
        eog_tokens=model.eog,
        metadata=model.metadata,
        chat_template=model.chat_template,
        features=frozenset({"logprobs", "speculative"}),
        pad_rows=model.pad_rows,
        batch_invariant=model.batch_invariant,
    )


@hookimpl
def free(model: LlamaModel) -> None:
    model.free()


@hookimpl
def tokenize(model: LlamaModel, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return model.tokenize(text, add_special, parse_special)


@hookimpl
def detokenize(model: LlamaModel, tokens: Sequence[int], special: bool) -> bytes:
    return model.detokenize(tokens, special)


@hookimpl
def step(
    model: LlamaModel, ops: Sequence[StepOp], on_sampled: Callable[[int, int], None] | None
) -> list[StepResult]:
    return model.step(ops, on_sampled)


@hookimpl
def kv_pack(model: LlamaModel, seq: int) -> bytearray:
    return model.kv_pack(seq)


@hookimpl
def kv_unpack(model: LlamaModel, seq: int, data: bytes | bytearray | memoryview) -> None:
    model.kv_unpack(seq, data)


@hookimpl
def seq_rm(model: LlamaModel, seq: int, start: int, end: int | None) -> None:
    model.seq_rm(seq, start, end)


@hookimpl
def apply_chat_template(
    model: LlamaModel,
    messages: Sequence[ChatMessage],
    system: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    verbatim: Sequence[tuple[str, Sequence[int]]],
) -> list[int]:
    return model.chat_tokens(messages, system, tools, add_generation_prompt, verbatim)


@hookimpl
def embed(model: LlamaModel, tokens: Sequence[int]) -> list[float]:
    return model.embed(tokens)


@hookimpl
def sampler_new(model: LlamaModel, params: SamplerParams) -> Sampler:
    return model.sampler_new(params)


@hookimpl
def sampler_free(model: LlamaModel, sampler: Sampler) -> None:
    sampler.free()


@hookimpl
def adapter_load(model: LlamaModel, path: str) -> Any:
    return model.adapter_load(path)


@hookimpl
def adapter_free(model: LlamaModel, adapter: Any) -> None:
    model.adapter_free(adapter)


@hookimpl
def adapters_apply(model: LlamaModel, adapters: Sequence[tuple[Any, float]]) -> None:
    model.adapters_apply(adapters)


@hookimpl
def metadata(model: LlamaModel) -> dict[str, str]:
    return dict(model.metadata)
