"""Checking what a caller asks for, on the event loop, before anything reaches the model.

Everything here is cheap and bounded: a prompt's length is checked before its ids, so a
million-id prompt is refused after one ``len``, and the id check runs over at most a
context's worth of ids.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from ..cache.key import parse_key
from ..errors import InvalidRequest

__all__ = [
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
#: Longest cache salt accepted.
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
        raise InvalidRequest(
            "prompt",
            f"{n} tokens do not fit the context of {n_ctx} "
            "(at least one token must be left for generation)",
        )


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


def check_cache_salt(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CACHE_SALT:
        raise InvalidRequest(
            "cache_salt", f"must be a non-empty string of at most {MAX_CACHE_SALT} characters"
        )
    check_text(value, "cache_salt")
    return value


def check_session(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SESSION_ID:
        raise InvalidRequest(
            "session_id", f"must be a non-empty string of at most {MAX_SESSION_ID} characters"
        )
    return value
