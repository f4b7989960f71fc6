"""What a request streams: sampled tokens turned into events, on the model thread.

Text is decoded incrementally (a character split across tokens is held until complete) and
the end-of-generation token is never streamed (it is still in the KV and in the context).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from ..events import Event, Token

__all__ = ["Output", "PieceCache"]


class PieceCache:
    """Token id -> its text bytes, computed once per token per model.

    The bytes of a token list are the concatenation of each token's bytes (the
    ``detokenize`` hook's contract), so a stream never detokenizes more than one new
    token, and a token seen before costs a dict lookup, not a native call and an allocation.
    """

    __slots__ = ("_detokenize", "_pieces")

    def __init__(self, detokenize: Callable[[int], bytes]) -> None:
        self._detokenize = detokenize
        self._pieces: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._detokenize(token)
        return piece


class Output:
    """Turns one request's sampled tokens into stream events."""

    __slots__ = ("_decode", "_pieces")

    def __init__(self, pieces: PieceCache) -> None:
        self._pieces = pieces
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def token(self, token: int, eog: bool, out: list[Event]) -> None:
        """Append the events for one sampled token to ``out``."""
        if eog:
            return
        out.append(Token(text=self._decode(self._pieces(token)), token_id=token))
