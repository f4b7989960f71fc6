"""The narrow interface a model worker uses to talk to the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from ..config import CachePolicy
from .key import Namespace

if TYPE_CHECKING:
    from .probe import CacheProbe

__all__ = ["CachePort", "NullCache", "Restore", "SaveReason"]

SaveReason = Literal["cold", "continued", "finish", "evict", "shutdown"]
SAVE_REASONS: tuple[SaveReason, ...] = ("cold", "continued", "finish", "evict", "shutdown")


@attrs.frozen(kw_only=True)
class Restore:
    """A row found at admission, its payload already read and verified."""

    key: bytes
    #: The prompt's tokens this restore provides: the row's whole token list (a prefix of,
    #: or equal to, the prompt), or for a covering row the part it shares with the prompt.
    tokens: tuple[int, ...]
    #: The state's bytes; for file rows a view into a reused buffer, see ``release``.
    payload: bytes | bytearray | memoryview
    source: Literal["exact", "parent", "prefix"]
    tier: str
    #: Tokens the payload holds. More than ``len(tokens)`` for a covering row (one that runs
    #: past where the prompt ends or differs): its cells from ``len(tokens)`` on are removed
    #: after unpacking. Cells before that depend only on the tokens before them, so what is
    #: left is exactly the state a cold prefill of ``tokens`` makes.
    row_tokens: int = attrs.field()

    @row_tokens.default
    def _whole_row(self) -> int:
        return len(self.tokens)


class CachePort(Protocol):
    """What :class:`~erllama.model.ModelWorker` needs from the cache."""

    @property
    def enabled(self) -> bool: ...

    async def lookup(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        parent_key: bytes | None,
        policy: CachePolicy,
        longer_than: int = 0,
    ) -> Restore | None:
        """Find the best row for ``tokens`` longer than ``longer_than`` tokens (what the
        sequence's live KV already covers): exact, then ``parent_key`` (waiting up to
        ``policy.resume_wait_s`` for a row another process is still publishing), then longest
        prefix, or a longer row sharing more of the prompt (restored, then trimmed).
        Counts the hit or miss. Never raises for damaged files: they are misses."""

    def prepare_save(
        self, ns: Namespace, tokens: Sequence[int], reason: SaveReason, policy: CachePolicy
    ) -> tuple[bytes | None, bool]:
        """Asked before packing, so a refused save costs nothing. Returns ``(key, pack)``:
        ``(key, True)`` go ahead; ``(key, False)`` the row already exists (the key is valid,
        nothing to write); ``(None, False)`` the cache will not take it."""

    def holds(self, key: bytes) -> bool:
        """Whether a row with ``key`` is indexed. Safe to call from a model thread (a plain
        dict membership read): a stale answer costs one redundant pack, or one skipped save
        that :meth:`save` then reports as dropped."""

    def note_pack(self, seconds: float) -> None:
        """Account time spent packing on a model thread."""

    def peek_longest(
        self, ns: Namespace, tokens: Sequence[int], policy: CachePolicy
    ) -> tuple[int, str, bytes] | None:
        """What a lookup of ``tokens`` would restore from a row (tokens, tier, the row's
        key), loading nothing."""

    def rows_of(self, ns: Namespace) -> list[Any]:
        """Every row of one namespace, newest first."""

    def probe(self, ns: Namespace, tokens: Sequence[int], *, foreign: bool) -> CacheProbe:
        """What the cache holds near ``tokens`` (the facts a miss is explained from),
        read from the indexes alone; ``foreign``: other namespaces too."""

    def note_dropped(self) -> None:
        """Account a save lost before it reached the cache (its pack failed)."""

    def note_live_hit(self) -> None:
        """Account an admission served by a sequence's own live KV."""

    def save(
        self, ns: Namespace, tokens: Sequence[int], payload: bytes | bytearray, reason: SaveReason
    ) -> bytes | None:
        """Hand a packed state to the cache without waiting on I/O. Returns the row's key
        once reserved (a ``parent_key`` lookup then waits for it), or None if dropped."""

    def reject(self, restore: Restore, why: str) -> None:
        """The backend refused a restored payload: drop the row and count it corrupt."""

    def release(self, restore: Restore) -> None:
        """The payload has been unpacked (or abandoned): its buffer may be reused."""


class NullCache:
    """The cache switched off: every lookup misses and nothing is saved."""

    enabled = False

    async def lookup(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        parent_key: bytes | None,
        policy: CachePolicy,
        longer_than: int = 0,
    ) -> Restore | None:
        return None

    def prepare_save(
        self, ns: Namespace, tokens: Sequence[int], reason: SaveReason, policy: CachePolicy
    ) -> tuple[bytes | None, bool]:
        return None, False

    def holds(self, key: bytes) -> bool:
        return False

    def peek_longest(
        self, ns: Namespace, tokens: Sequence[int], policy: CachePolicy
    ) -> tuple[int, str, bytes] | None:
        return None

    def rows_of(self, ns: Namespace) -> list[Any]:
        return []

    def probe(self, ns: Namespace, tokens: Sequence[int], *, foreign: bool) -> CacheProbe:
        from .probe import CacheProbe

        return CacheProbe()

    def note_pack(self, seconds: float) -> None:
        pass

    def note_dropped(self) -> None:
        pass

    def note_live_hit(self) -> None:
        pass

    def save(
        self, ns: Namespace, tokens: Sequence[int], payload: bytes | bytearray, reason: SaveReason
    ) -> bytes | None:
        return None

    def reject(self, restore: Restore, why: str) -> None:
        pass

    def release(self, restore: Restore) -> None:
        pass
