"""Ollama's ``keep_alive``: how long a model stays loaded after a request.

Ollama takes a number of seconds or a Go duration string (``"5m"``, ``"1h30m"``,
``"300ms"``, ``"0"``); a negative value keeps the model loaded for good, ``0`` unloads it
once the request ends, and a request without one gets five minutes.

The Ollama routes (and ``erllama.keep_alive`` on the others) pass it to the engine's model
lifecycle, which unloads an idle model once its keep-alive runs out (docs/loading.md, model
lifecycle); a request without one leaves the model's configured ``keep_alive_s``.
:func:`parse_keep_alive` is the one place its meaning is decided.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["DEFAULT_KEEP_ALIVE_S", "parse_keep_alive"]

#: Ollama's default when a request names none.
DEFAULT_KEEP_ALIVE_S = 300.0

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[-+]?(\d+(?:\.\d*)?|\.\d+)")


def _duration(text: str) -> float:
    """A Go duration (``time.ParseDuration``), or a bare number of seconds, in seconds."""
    s = text.strip()
    if _NUMBER.fullmatch(s):
        return float(s)
    sign = 1.0
    if s and s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"is not a duration: {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"is not a duration (like '5m', '1h30m', '0' or seconds): {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """``keep_alive`` in seconds; None: keep the model loaded for good (a negative value).
    A request that names none means :data:`DEFAULT_KEEP_ALIVE_S`. ValueError (the reason)
    for anything else than a number or a duration string."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number of seconds or a duration string such as '5m'")
    seconds = float(value) if not isinstance(value, str) else _duration(value)
    if not math.isfinite(seconds):
        raise ValueError(f"must be finite, got {value!r}")
    return None if seconds < 0 else seconds
