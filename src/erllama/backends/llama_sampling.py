"""llama.cpp sampler chains for requests, and grammar errors carried in the typed error.

Chain order: grammar -> logit bias -> penalties (repetition, frequency, presence) -> top-k ->
top-p -> min-p -> temperature -> seeded draw, or greedy. A request that draws also gets a
greedy twin for tool-call syntax.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp as L
import numpy as np

from ..errors import InvalidRequest
from ..grammar_cost import check_grammar
from ..sampling import SamplerParams

__all__ = ["Sampler", "new_sampler"]


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture what native code writes to fd 2 during the block (llama.cpp's grammar parser
    prints its errors there): the caller puts it in a typed error instead. Process-wide, so
    held only around one short native call."""
    with _stderr_lock, tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            text = ""

            def said() -> str:
                return text

            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", errors="replace")


class Sampler:
    """A per-request llama.cpp sampler chain (owned; freed with ``free``).

    A request that draws (temperature > 0) also gets a greedy twin: the same grammar and
    penalties, then argmax. ``Decode(greedy=True)`` samples with the twin; whichever chain
    picks, the other accepts the token, so their grammar states and penalty windows never
    drift apart."""

    def __init__(self, ptr: Any, greedy_ptr: Any = None) -> None:
        self.ptr = ptr
        self.greedy_ptr = greedy_ptr
        #: The chain holds a grammar (its steps are timed against the model's limit).
        self.has_grammar = False

    def sample(self, ctx: Any, row: int, greedy: bool) -> int:
        if greedy and self.greedy_ptr:
            tok = int(L.llama_sampler_sample(self.greedy_ptr, ctx, row))
            L.llama_sampler_accept(self.ptr, tok)
            return tok
        tok = int(L.llama_sampler_sample(self.ptr, ctx, row))
        if self.greedy_ptr:
            L.llama_sampler_accept(self.greedy_ptr, tok)
        return tok

    def sample_logits(self, logits: np.ndarray[Any, Any], greedy: bool) -> int:
        """As :meth:`sample`, from logits copied out of the context (``LlamaModel.step``
        keeps them when another call of the step would overwrite the context's)."""
        if greedy and self.greedy_ptr:
            tok = _apply(self.greedy_ptr, logits)
            L.llama_sampler_accept(self.ptr, tok)
            return tok
        tok = _apply(self.ptr, logits)
        if self.greedy_ptr:
            L.llama_sampler_accept(self.greedy_ptr, tok)
        return tok

    def choose(self, logits: np.ndarray[Any, Any]) -> int:
        """The token the request's greedy chain picks from ``logits``, not accounted (a
        speculative draft's check): :meth:`accept` it if it is kept. -1: none allowed."""
        return _select(self.greedy_ptr or self.ptr, logits)

    def accept(self, token: int) -> None:
        """Account ``token`` in both chains, as if it had been sampled."""
        L.llama_sampler_accept(self.ptr, token)
        if self.greedy_ptr:
            L.llama_sampler_accept(self.greedy_ptr, token)

    def free(self) -> None:
        for name in ("ptr", "greedy_ptr"):
            ptr = getattr(self, name)
            if ptr:
                L.llama_sampler_free(ptr)
                setattr(self, name, None)


#: llama.cpp's ``llama_token_data`` as a numpy record.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def _apply(chain: Any, logits: np.ndarray[Any, Any]) -> int:
    """What ``llama_sampler_sample`` does, from ``logits`` instead of a context's row:
    every token as a candidate, the chain applied, the selected token accepted."""
    tok = _select(chain, logits)
    if tok >= 0:
        L.llama_sampler_accept(chain, tok)
    return tok


def _select(chain: Any, logits: np.ndarray[Any, Any]) -> int:
    """The chain applied to ``logits`` (every token a candidate); the selected token, not
    accepted, or -1 when none is left (a grammar that allows none)."""
    n = len(logits)
    data = np.empty(n, dtype=_TOKEN_DATA)
    data["id"] = np.arange(n, dtype=np.int32)
    data["logit"] = logits
    data["p"] = 0.0
    cur = L.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
        size=n,
        selected=-1,
        sorted=False,
    )
    L.llama_sampler_apply(chain, ctypes.byref(cur))
    if not 0 <= cur.selected < cur.size:
        return -1  # no token left (a grammar that allows none): the caller fails it
    return int(cur.data[cur.selected].id)


def new_sampler(vocab: Any, params: SamplerParams, n_ctx: int) -> Sampler:
    """A request's sampler chain, and its greedy twin when it draws (temperature > 0).
    ``n_ctx``: a sequence's context, the penalties' window when ``penalty_last_n`` is -1.

    The penalties count the tokens the sampler has picked (the reply so far), not the
    prompt's."""
    if params.grammar is not None:
        # What it would cost llama.cpp's sampler, before llama.cpp sees it: some small
        # grammars make one sampling step run for minutes (see grammar_cost). Here, not
        # at intake: this runs on a worker thread, and the check is linear in the text.
        check_grammar(params.grammar)
    sampler = Sampler(_chain(vocab, params, n_ctx, greedy=params.temperature <= 0))
    sampler.has_grammar = params.grammar is not None
    try:
        if params.temperature > 0:
            sampler.greedy_ptr = _chain(vocab, params, n_ctx, greedy=True)
    except BaseException:
        sampler.free()
        raise
    return sampler


def _chain(vocab: Any, params: SamplerParams, n_ctx: int, *, greedy: bool) -> Any:
    """grammar -> logit bias -> penalties -> (greedy: argmax | top-k -> top-p -> min-p ->
    temperature -> seeded draw)."""
    n_vocab = int(L.llama_vocab_n_tokens(vocab))
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        if params.grammar is not None:
            with _stderr_captured() as said:
                g = L.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not g:
                detail = " ".join(said().split()) or "llama.cpp could not parse it"
                raise InvalidRequest("grammar", f"GBNF does not parse: {detail}")
            L.llama_sampler_chain_add(chain, g)
        if params.logit_bias:
            biases = (L.llama_logit_bias * len(params.logit_bias))(
                *(L.llama_logit_bias(token, bias) for token, bias in params.logit_bias)
            )
            # llama.cpp copies the array: ``biases`` may go when this returns.
            L.llama_sampler_chain_add(
                chain, L.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases)
            )
        if params.penalized:
            # llama.cpp 0.3.36: (n_vocab, last_n, repeat, freq, present). It reads a
            # negative last_n as 0 (off): the whole context is n_ctx tokens.
            last_n = n_ctx if params.penalty_last_n < 0 else params.penalty_last_n
            L.llama_sampler_chain_add(
                chain,
                L.llama_sampler_init_penalties(
                    n_vocab,
                    last_n,
                    params.repetition_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if greedy:
            # top-k/p and min-p never change the most likely token.
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(params.seed))
    except BaseException:
        L.llama_sampler_free(chain)
        raise
    return chain
