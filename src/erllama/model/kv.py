"""The KV side of one model's sequences, on its thread: reuse, restores and saves.

* **Reuse.** A finished request's cells stay in its sequence (``ModelConfig.keep_live_kv``);
  the next prompt admitted there keeps the common prefix and feeds only the rest.
* **Restores.** A cache row found at admission is unpacked into the request's sequence.
* **Saves.** States are packed here, between steps (a concurrent decode would tear them),
  and handed to the event loop as :class:`SaveOrder` s; the cache's writers take it from
  there, so a save never waits on I/O.

Every method runs on the model thread. Effects on the cache (which lives on the event loop)
go through ``post``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ..cache.key import (
    Namespace,
    common_prefix_tokens,
    decode_tokens,
    encode_tokens,
    kv_layout_hash,
)
from ..cache.policy import cold_save_point, passes_gate, wants_continued
from ..cache.port import CachePort, Restore, SaveReason
from ..config import CachePolicy
from ..errors import BackendError
from ..events import CacheHit
from ..plugins import Backend
from .snapshot import LivePrefix

__all__ = ["KVTrack", "Namespaces", "SaveOrder", "SequenceKV", "Setup"]

log = logging.getLogger("erllama.model")

COLD = CacheHit(kind="cold", prefix_len=0)


class Namespaces:
    """The cache namespace of each effective fingerprint of one loaded model (its
    quantisation and KV layout are fixed). Called from both threads: a race only computes
    the same value twice."""

    def __init__(self, quant: int, kv_layout: Mapping[str, Any]) -> None:
        self._quant = quant
        self._layout = kv_layout_hash(kv_layout)
        self._known: dict[bytes, Namespace] = {}

    def __call__(self, fingerprint: bytes) -> Namespace:
        ns = self._known.get(fingerprint)
        if ns is None:
            ns = self._known[fingerprint] = Namespace(fingerprint, self._quant, self._layout)
        return ns


@attrs.define(eq=False)
class KVTrack:
    """Cache bookkeeping of one request. Written on the model thread only; the loop reads it
    only after the request has ended. (What the cache did with its saves is the loop's own
    :class:`~erllama.model.request.SaveTally`.)"""

    prompt: tuple[int, ...]
    parent_key: bytes | None
    #: The adapter-folded fingerprint the request runs with, fixed at admission (adapter
    #: changes wait until no request is admitted): every lookup and save of it uses this.
    fingerprint: bytes = b""
    #: Every token in the sequence's KV: restored + fed + generated (thinking, tool calls
    #: and the end-of-generation token included), so a save's key always describes its KV.
    context: list[int] = attrs.Factory(list)
    hit: CacheHit = COLD
    #: Prompt tokens the sequence's live KV already held at admission.
    live_len: int = 0
    #: The sequence is the request's own session's (its live KV is the session context).
    session: bool = False
    last_save_at: int = 0


@attrs.frozen
class SaveOrder:
    """A state packed on the model thread for the loop to give to the cache."""

    ns: Namespace
    tokens: tuple[int, ...]
    #: None when the cache already holds the row (nothing was packed).
    payload: bytes | bytearray | None
    reason: SaveReason
    key: bytes


@attrs.frozen
class Setup:
    """What :meth:`SequenceKV.setup` put into a sequence."""

    n_context: int
    cursor: list[int]
    pause_at: int | None


class SequenceKV:
    """Live reuse, restores and saves for one model (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        handle: Any,
        cache: CachePort,
        policy: CachePolicy,
        keep_live: bool,
        namespace: Callable[[bytes], Namespace],
        post: Callable[..., object],
        on_live: Callable[[tuple[LivePrefix, ...]], None],
    ) -> None:
        self.backend = backend
        self.handle = handle
        self.cache = cache
        self.policy = policy
        self.keep_live = keep_live
        self.namespace = namespace
        self._post = post
        self._on_live = on_live
        #: Free or pinned sequences still holding their last request's KV: (token bytes,
        #: fingerprint). Published through ``on_live`` after every change.
        self.live: dict[int, tuple[bytes, bytes]] = {}

    def _live_changed(self) -> None:
        self._on_live(tuple(LivePrefix(t, fp) for t, fp in self.live.values()))

    # ---- admission ------------------------------------------------------------------------

    def choose(self, track: KVTrack, free: Sequence[int]) -> int:
        """The free sequence whose live KV shares the longest useful prefix with the prompt
        (under the request's fingerprint); sets ``track.live_len``. A prefix shorter than
        ``min_tokens`` is not worth spoiling another prompt's live KV for: then an empty
        sequence is preferred."""
        prompt = encode_tokens(track.prompt) if self.live else b""
        floor = min(self.policy.min_tokens, len(track.prompt))
        best: tuple[int, bool, int] | None = None  # (usable prefix, empty?, seq)
        for seq in free:
            live = self.live.get(seq)
            n = 0
            if live is not None and live[1] == track.fingerprint:
                n = common_prefix_tokens(live[0], prompt)
            candidate = (n if n >= floor else 0, live is None, seq)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        assert best is not None
        track.live_len = best[0]
        return best[2]

    def match(self, track: KVTrack, seq: int, *, session: bool = False) -> None:
        """Set ``track.live_len`` to the prompt prefix ``seq``'s live KV holds (a session's
        own sequence: any length is worth keeping)."""
        live = self.live.get(seq)
        n = 0
        if live is not None and live[1] == track.fingerprint:
            n = common_prefix_tokens(live[0], encode_tokens(track.prompt))
        track.live_len = n
        track.session = session

    def setup(self, track: KVTrack, seq: int, restore: Restore | None) -> Setup:
        """Put the prompt's best known prefix into ``seq``, or clear it.

        The prefix comes from a cache row (restored), from the sequence's own live KV (cells
        past the common prefix removed), or nowhere (cold). States carry no logits. A
        partial hit needs none from the known part: the rest of the prompt is fed after its
        cells exactly as a cold run (with the same chunk boundaries) would. Only an exact hit
        drops the last cell and feeds that one token again, alone, as it was fed when the
        cell was first made; so greedy output after a hit matches the unbroken run.
        """
        had_live = self.live.pop(seq, None) is not None
        if had_live:
            self._live_changed()
        prompt = track.prompt
        n_prompt = len(prompt)
        backend, handle = self.backend, self.handle
        if restore is not None:
            exact = len(restore.tokens) == n_prompt
            try:
                if had_live:
                    backend.seq_rm(handle, seq, 0, None)
                backend.kv_unpack(handle, seq, restore.payload)
                if restore.row_tokens > len(restore.tokens):
                    # A covering row: keep only what the prompt shares with it.
                    backend.seq_rm(handle, seq, len(restore.tokens), None)
                if exact:
                    backend.seq_rm(handle, seq, n_prompt - 1, None)
            except BackendError as exc:
                self._post(self.cache.reject, restore, str(exc))
                restore, had_live, track.live_len = None, True, 0
            finally:
                if restore is not None:
                    self._post(self.cache.release, restore)
        if restore is not None:
            known = len(restore.tokens)
            track.hit = CacheHit(
                kind="exact" if exact else "partial",
                prefix_len=known,
                source=restore.source,
                tier=restore.tier,
            )
        elif track.live_len:
            known = track.live_len
            exact = known == n_prompt
            backend.seq_rm(handle, seq, known - 1 if exact else known, None)
            track.hit = CacheHit(
                kind="exact" if exact else "partial",
                prefix_len=known,
                source="session" if track.session else "live",
            )
            self._post(self.cache.note_live_hit)
        else:
            known, exact = 0, False
            backend.seq_rm(handle, seq, 0, None)
            track.hit = COLD
        n_context = known - 1 if exact else known
        track.context = list(prompt[:n_context])
        track.last_save_at = known
        point = cold_save_point(n_prompt, self.policy) if self.cache.enabled else None
        return Setup(
            n_context=n_context,
            cursor=list(prompt[n_context:]),
            pause_at=point if point is not None and point > known else None,
        )

    # ---- saves ------------------------------------------------------------------------------

    def wants_continued(self, track: KVTrack) -> bool:
        return self.cache.enabled and wants_continued(
            len(track.context), track.last_save_at, self.policy
        )

    def save(
        self, track: KVTrack, seq: int, reason: SaveReason, *, force: bool = False
    ) -> SaveOrder | None:
        """Pack ``seq`` for a save of ``track.context`` if the policy and the cache want it
        (``force``: whatever the policy's minimum length, as ``prefill_only`` asks).

        A row the cache already holds is not packed again (the order then carries only its
        key). A failing pack loses this save only: the KV is untouched, so the model serves
        on; it is logged and counted as dropped.
        """
        tokens = tuple(track.context)
        if not self.cache.enabled or not tokens:
            return None
        if not force and not passes_gate(len(tokens), reason, self.policy):
            return None
        order = self._pack(seq, tokens, track.fingerprint, reason)
        if order is not None:
            track.last_save_at = len(tokens)
        return order

    def save_live(self, seq: int, reason: SaveReason) -> SaveOrder | None:
        """Save the live KV a free or pinned sequence holds (unconditionally)."""
        live = self.live.get(seq)
        if live is None or not self.cache.enabled:
            return None
        return self._pack(seq, decode_tokens(live[0]), live[1], reason)

    def _pack(
        self, seq: int, tokens: tuple[int, ...], fingerprint: bytes, reason: SaveReason
    ) -> SaveOrder | None:
        ns = self.namespace(fingerprint)
        key = ns.key(tokens)
        payload: bytes | bytearray | None = None
        if not self.cache.holds(key):
            t0 = time.perf_counter()
            try:
                payload = self.backend.kv_pack(self.handle, seq)
            except BackendError:
                log.warning("packing sequence %d for a %s save failed", seq, reason, exc_info=True)
                self._post(self.cache.note_dropped)
                return None
            self._post(self.cache.note_pack, time.perf_counter() - t0)
        return SaveOrder(ns=ns, tokens=tokens, payload=payload, reason=reason, key=key)

    def release(self, track: KVTrack, seq: int, *, keep: bool = False) -> None:
        """The request on ``seq`` ended: keep its cells for the next prompt (always for a
        session's pinned sequence), or clear them."""
        if keep or self.keep_live:
            self.live[seq] = (encode_tokens(track.context), track.fingerprint)
        else:
            self.backend.seq_rm(self.handle, seq, 0, None)
            self.live.pop(seq, None)
        self._live_changed()

    def forget(self, seq: int) -> None:
        """``seq``'s cells are no longer what ``live`` says (it failed, or was cleared)."""
        if self.live.pop(seq, None) is not None:
            self._live_changed()
