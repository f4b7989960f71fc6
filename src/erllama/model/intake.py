"""Checking what a caller asks for, on the event loop, before anything reaches the model.

Everything here is cheap and bounded: a prompt's length is checked before its ids, so a
million-id prompt is refused after one ``len``, and the id check runs over at most a
context's worth of ids.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..cache.key import parse_key
from ..config import MAX_DRAFT
from ..errors import ContextLengthExceeded, InvalidRequest
from ..sampling import SamplerParams, validate_max_tokens
from .stops import check_stops

__all__ = [
    "RequestArgs",
    "check_budget",
    "check_cache_salt",
    "check_prompt_length",
    "check_session",
    "check_flag",
    "check_text",
    "check_token_ids",
    "parse_parent_key",
    "prompt_kind",
]

#: Longest session id accepted (ids are kept in memory for the session's life).
MAX_SESSION_ID = 256
#: Longest cache salt accepted (a server derives one per API key; clients may add one).
MAX_CACHE_SALT = 1024


def prompt_kind(prompt: object) -> str:
    """``"text"`` or ``"ids"``; InvalidRequest for anything else (with a hint for chat
    messages, the most common mistake)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt", "is empty")
        return "text"
    if isinstance(prompt, bytes | bytearray | memoryview):
        raise InvalidRequest("prompt", "must be text (str) or token ids, not bytes")
    if isinstance(prompt, Mapping):
        raise InvalidRequest("prompt", "must be text or token ids, not a mapping")
    if isinstance(prompt, Sequence) or hasattr(prompt, "__array__"):
        items: Any = prompt
        if len(items) and isinstance(items[0], Mapping):
            raise InvalidRequest(
                "prompt",
                "looks like chat messages: render them with engine.apply_chat_template(...) "
                "or call engine.chat(...)",
            )
        return "ids"
    raise InvalidRequest(
        "prompt", f"must be text or a sequence of token ids, not {type(prompt).__name__}"
    )


def check_flag(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(param, f"must be True or False, got {value!r}")
    return value


def check_text(text: str, param: str) -> None:
    """Text that cannot be encoded (a lone surrogate) is the caller's mistake, not the
    backend's: InvalidRequest naming ``param``. Runs off the loop: it is proportional to
    the text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            param, f"is not valid text ({exc.reason} at position {exc.start})"
        ) from None


def check_prompt_length(n: int, n_ctx: int) -> None:
    if n == 0:
        raise InvalidRequest("prompt", "is empty")
    if n >= n_ctx:
        raise ContextLengthExceeded(n, n_ctx)


def check_token_ids(tokens: Sequence[int], n_vocab: int, param: str) -> list[int]:
    """Token ids as a list, each an int inside the vocabulary (checked before any native
    call: an out-of-range id would make llama.cpp abort the process)."""
    given: object = tokens  # callers pass anything a user passed
    if isinstance(given, str | bytes | bytearray | Mapping) or not (
        isinstance(given, Sequence) or hasattr(given, "__array__")
    ):
        raise InvalidRequest(param, f"must be a sequence of token ids, not {type(given).__name__}")
    try:
        # One C pass: refuses floats, strings and ids outside a C long.
        ids = array("q", tokens)
    except (TypeError, OverflowError):
        ids = None
    if (
        ids is not None
        and (not ids or (min(ids) >= 0 and max(ids) < n_vocab))
        and not any(isinstance(t, bool) for t in tokens)
    ):
        return ids.tolist()
    for t in tokens:  # the slow path only names the offender
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            raise InvalidRequest(
                param, f"token id {t!r} is outside the vocabulary (0..{n_vocab - 1})"
            )
    return list(tokens)


def parse_parent_key(parent_key: str | bytes | bytearray | memoryview | None) -> bytes | None:
    if parent_key is None:
        return None
    if isinstance(parent_key, bytearray | memoryview):
        parent_key = bytes(parent_key)  # any bytes-like key
    try:
        return parse_key(parent_key)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("parent_key", str(exc)) from None


def check_budget(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest("thinking_budget_tokens", f"must be an integer >= 1, got {value!r}")
    return value


def check_bias_ids(bias: Sequence[tuple[int, float]], n_vocab: int) -> None:
    """Every token a logit bias names is in the vocabulary."""
    for token, _ in bias:
        if token >= n_vocab:
            raise InvalidRequest(
                "logit_bias", f"token id {token} is outside the vocabulary (0..{n_vocab - 1})"
            )


def check_logprobs(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            "logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, got {value!r}"
        )
    return value


def check_cache_salt(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CACHE_SALT:
        raise InvalidRequest(
            "cache_salt", f"must be a non-empty string of at most {MAX_CACHE_SALT} characters"
        )
    check_text(value, "cache_salt")
    return value


def check_opt_flag(value: object, param: str) -> bool | None:
    return None if value is None else check_flag(value, param)


def check_draft_max(value: object) -> int | None:
    return None if value is None else check_draft_len(value, "draft_max")


def check_draft_len(value: object, param: str) -> int:
    """A draft length: an integer in [0, MAX_DRAFT]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DRAFT:
        raise InvalidRequest(param, f"must be an integer in [0, {MAX_DRAFT}], got {value!r}")
    return value


def check_session(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SESSION_ID:
        raise InvalidRequest(
            "session_id", f"must be a non-empty string of at most {MAX_SESSION_ID} characters"
        )
    return value


#: The sampler's keywords (see :class:`~erllama.sampling.SamplerParams`).
_SAMPLER_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_last_n",
    "logit_bias",
    "grammar",
)

#: Most alternatives a token's log-probabilities may list (OpenAI's ``top_logprobs`` limit).
MAX_TOP_LOGPROBS = 20


@attrs.frozen(kw_only=True)
class RequestArgs:
    """Every keyword argument of a request (``Engine.infer``'s, typed for callers by
    :class:`erllama.options.RequestOptions`), validated once, in one place.

    :meth:`build` takes the caller's keywords as given and raises InvalidRequest naming the
    first bad one (TypeError for an unknown keyword, as a Python signature would).
    """

    max_tokens: int | None = None
    #: The sampler chain, its seed still to be drawn when ``seed`` is None.
    sampler: SamplerParams = attrs.field(factory=SamplerParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    thinking: bool = False
    thinking_budget_tokens: int | None = None
    session_id: str | None = None
    parent_key: bytes | None = None
    add_special: bool = True
    #: Report each generated token's log-probability and this many alternatives (0: the
    #: token's own only); None: none.
    logprobs: int | None = None
    #: Only requests with the same salt share cached KV (rows and a sequence's leftover
    #: live KV); see ``erllama.cache.key.salted``.
    cache_salt: str | None = None
    #: Speculative decoding: None follows the model (``ModelConfig.speculative``), False
    #: turns it off, True requires it (InvalidRequest where it cannot apply).
    speculative: bool | None = None
    #: Most tokens one draft may have (0: none); None: the model's ``draft_max``.
    draft_max: int | None = None

    @classmethod
    def build(cls, **kwargs: Any) -> RequestArgs:
        unknown = kwargs.keys() - _KEYS
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        sampling = {k: kwargs[k] for k in _SAMPLER_KEYS if k in kwargs}
        seed = kwargs.get("seed")
        # Validated with a stand-in seed: the real one is drawn at intake when None.
        sampler = SamplerParams.build(**sampling, seed=0 if seed is None else seed)
        return cls(
            max_tokens=validate_max_tokens(kwargs.get("max_tokens")),
            sampler=sampler,
            seed=None if seed is None else sampler.seed,
            stop=check_stops(kwargs.get("stop")),
            thinking=check_flag(kwargs.get("thinking", False), "thinking"),
            thinking_budget_tokens=check_budget(kwargs.get("thinking_budget_tokens")),
            session_id=check_session(kwargs.get("session_id")),
            parent_key=parse_parent_key(kwargs.get("parent_key")),
            add_special=check_flag(kwargs.get("add_special", True), "add_special"),
            logprobs=check_logprobs(kwargs.get("logprobs")),
            cache_salt=check_cache_salt(kwargs.get("cache_salt")),
            speculative=check_opt_flag(kwargs.get("speculative"), "speculative"),
            draft_max=check_draft_max(kwargs.get("draft_max")),
        )

    @staticmethod
    def keywords() -> frozenset[str]:
        """Every keyword :meth:`build` takes."""
        return _KEYS

    def sampler_with(self, seed: int) -> SamplerParams:
        """The sampler chain with its seed (the caller's, or the one drawn for it)."""
        return attrs.evolve(self.sampler, seed=seed if self.seed is None else self.seed)


_KEYS = frozenset(
    (
        *(f.name for f in attrs.fields(RequestArgs) if f.name != "sampler"),
        *_SAMPLER_KEYS,
    )
)
