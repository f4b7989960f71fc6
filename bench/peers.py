"""llama-cpp-python's high-level ``llama_cpp.Llama`` as a peer, used the way a server uses it:
one ``Llama`` instance (one llama.cpp context, a single sequence) serving every request, with
``LlamaRAMCache``, ``LlamaDiskCache`` or no cache set on it.

What the peer does differently from erllama (so its numbers can be read fairly):

- The live context holds one conversation at a time; a request that continues a different
  conversation finds a mismatched context and must restore or re-prefill.
- ``LlamaRAMCache`` / ``LlamaDiskCache`` key states by their full token list and look up by
  longest common token prefix with a Python scan over every key. A hit restores the *whole*
  llama state (``llama_state_set_data``) plus a copy of the logits buffer (up to
  ``n_batch`` x ``n_vocab`` floats: 100 MB for this model), then trims to the common prefix and
  re-evaluates the rest. Every completion saves a new full state (``save_state``), in the
  request path. ``LlamaDiskCache`` pickles states into a ``diskcache`` folder and *removes*
  the entry it matched on every lookup (``pop``), even when the match is a few template
  tokens and the state is then not used.
- Greedy sampling is ``temperature=0.0``; the context settings match erllama's
  (n_ctx 4096, n_batch 512, 2 threads, flash attention on).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import FLASH_ATTN, GIB, N_BATCH, N_CTX, on_own_thread


class LlamaPeer:
    def __init__(
        self, model_path: Path, *, threads: int, cache: str | None, cache_dir: Path | None = None
    ) -> None:
        import llama_cpp

        self.kind = cache
        with contextlib.redirect_stderr(io.StringIO()):
            self.llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=N_CTX,
                n_batch=N_BATCH,
                n_ubatch=N_BATCH,
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=FLASH_ATTN,
                seed=0,
                verbose=False,
            )
        # One small request before any cache is set: the first decode allocates buffers.
        self.complete([*self.llm.tokenize(b"Warm-up.")], max_tokens=2)
        if cache == "ram":
            self.llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=GIB))
        elif cache == "disk":
            assert cache_dir is not None
            self.llm.set_cache(
                llama_cpp.LlamaDiskCache(cache_dir=str(cache_dir), capacity_bytes=16 * GIB)
            )
        elif cache is not None:
            raise ValueError(cache)

    def reuse(self, prompt: Sequence[int]) -> int:
        """Prompt tokens the next request will not re-evaluate (outside any timing): the
        longer of the live context's common prefix and the best cache entry's."""
        from llama_cpp import Llama

        live = Llama.longest_token_prefix(self.llm._input_ids.tolist(), prompt)
        cached = 0
        cache = self.llm.cache
        if cache is not None:
            key = cache._find_longest_prefix_key(tuple(prompt))
            if key is not None:
                cached = Llama.longest_token_prefix(key, prompt)
        best = max(live, cached)
        return best - 1 if best == len(prompt) else best

    def complete(self, prompt: Sequence[int], *, max_tokens: int) -> dict[str, Any]:
        """Stream one completion; time to first chunk and to the end (cache save included).
        Computed on a thread of its own (see ``common.on_own_thread``)."""
        result: dict[str, Any] = on_own_thread(self._complete, prompt, max_tokens=max_tokens)
        return result

    def _complete(self, prompt: Sequence[int], *, max_tokens: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        first = None
        n = 0
        # LlamaDiskCache prints progress lines to stderr on every save.
        with contextlib.redirect_stderr(io.StringIO()):
            for chunk in self.llm.create_completion(
                list(prompt), max_tokens=max_tokens, temperature=0.0, stream=True
            ):
                if first is None:
                    first = time.perf_counter()
                if chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"] is None:
                    n += 1
        end = time.perf_counter()
        assert first is not None
        return {"ttft_s": first - t0, "total_s": end - t0, "chunks": n}

    def close(self) -> None:
        self.llm.close()
