"""Stop strings over a stream of text bytes, holding back only what could still match.

Matching is on UTF-8 bytes, so a stop string may span tokens and split characters. After
each piece the matcher releases every byte that can no longer be part of a match: all but
the longest tail of the pending bytes that is a proper prefix of some stop string, so at most
``longest stop string - 1`` bytes are held. The earliest match by text position wins (on a
tie, the longest string). Matched text is never released.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_STOP_BYTES", "MAX_STOPS", "StopMatcher", "check_stops"]

#: Limits per request, so matching stays cheap per token.
MAX_STOPS = 16
MAX_STOP_BYTES = 256


def check_stops(stop: object) -> tuple[str, ...]:
    """Validate ``stop`` (a string or a sequence of strings); raises InvalidRequest."""
    from ..errors import InvalidRequest

    if stop is None:
        return ()
    items: Sequence[object] = [stop] if isinstance(stop, str) else stop  # type: ignore[assignment]
    if not isinstance(items, Sequence) or isinstance(items, bytes | bytearray):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise InvalidRequest("stop", f"at most {MAX_STOPS} strings, got {len(items)}")
    out = []
    bare = isinstance(stop, str)
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise InvalidRequest("stop" if bare else f"stop[{i}]", "must be a non-empty string")
        try:
            n = len(s.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidRequest(f"stop[{i}]", "is not valid text") from None
        if n > MAX_STOP_BYTES:
            raise InvalidRequest(f"stop[{i}]", f"is {n} bytes; at most {MAX_STOP_BYTES}")
        out.append(s)
    return tuple(dict.fromkeys(out))


class StopMatcher:
    """Feed text bytes with :meth:`feed`; each call returns the bytes safe to release."""

    __slots__ = ("_hold", "_pending", "_stops", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [(s, s.encode("utf-8")) for s in stops]
        self._pending = bytearray()
        # The longest proper prefix of any stop string, in bytes.
        self._hold = max((len(b) for _, b in self._stops), default=1) - 1
        #: The stop string that matched, once one has.
        self.matched: str | None = None

    def feed(self, data: bytes) -> bytes:
        """Add ``data``; return what can be released now (everything before a match, once
        one is found: the caller then stops the request)."""
        if self.matched is not None:
            return b""
        pending = self._pending
        pending += data
        best: tuple[int, int, str] | None = None  # (position, -length, string)
        for text, raw in self._stops:
            at = pending.find(raw)
            if at >= 0 and (best is None or (at, -len(raw)) < best[:2]):
                best = (at, -len(raw), text)
        if best is not None:
            self.matched = best[2]
            out = bytes(pending[: best[0]])
            pending.clear()
            return out
        keep = self._held_tail()
        cut = len(pending) - keep
        out = bytes(pending[:cut])
        del pending[:cut]
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of the pending bytes that begins some stop string."""
        pending = self._pending
        for n in range(min(self._hold, len(pending)), 0, -1):
            tail = pending[-n:]
            if any(raw.startswith(tail) for _, raw in self._stops):
                return n
        return 0

    def flush(self) -> bytes:
        """The request ended without a match: release what was held."""
        out = bytes(self._pending)
        self._pending.clear()
        return out
