"""The KV side of one model's sequences, on its thread: reuse, restores and saves.

* **Reuse.** A finished request's cells stay in its sequence (``ModelConfig.keep_live_kv``);
  the next prompt admitted there keeps the common prefix and feeds only the rest.
* **Restores.** A cache row found at admission is unpacked into the request's sequence.
* **Saves.** States are packed here, between steps (a concurrent decode would tear them),
  and handed to the event loop as :class:`SaveOrder` s; the cache's writers take it from
  there, so a save never waits on I/O.

**Exactness: a cache hit never changes an answer.** llama.cpp computes a token's KV cell
with kernels chosen by the size of its micro-batch, so the same prompt fed in other chunks
gives cells that differ in the last bits, and a temperature-0 answer may then differ. So
every prompt is fed on one fixed grid of absolute positions, ``[jG, (j+1)G)`` with G the
model's ``prefill_chunk`` (``Scheduler.schedule``), each chunk in a call of its own, and a
prefix is reused only in whole grid cells computed that way (:meth:`SequenceKV.setup`): a
warm start then makes exactly the calls the cold run made from the same point, and its
cells, logits and tokens are the cold run's, bit for bit. Cells that were computed any other
way are never kept or saved: a prompt's last partial cell (fed as a shorter chunk) and every
generated token (fed one at a time); when a request ends its sequence is cut back to its
prompt's whole cells (:meth:`SequenceKV.finish`). Every row and every live prefix therefore
holds exactly-computed cells only, and a lookup needs no further rule.

**Padded chunks** (``LoadedModel.pad_rows``): the backend computes every prompt cell the same
way wherever its chunk starts, so the grid is 1 (any prompt prefix is reused, a finished
prompt is kept whole), except that nothing past ``exact_limit`` is kept or restored: the
last ``pad_rows - 1`` cells of a context have no room for fillers (docs/caching.md).

Every method runs on the model thread. Effects on the cache (which lives on the event loop)
go through ``post``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import attrs

from ..cache.key import (
    Namespace,
    common_prefix_tokens,
    decode_tokens,
    encode_tokens,
    kv_layout_hash,
)
from ..cache.policy import cold_save_point, passes_gate
from ..cache.port import CachePort, Restore, SaveReason
from ..config import CachePolicy
from ..errors import BackendError
from ..events import CacheExplanation, CacheHit
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
    #: Leading ``context`` cells the sequence kept when the request ended (the rest were
    #: computed and dropped: see the module docstring).
    kept: int = 0
    #: Why the prompt was restored as far as it was, set once the sequence is set up.
    explain: CacheExplanation | None = None


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
        grid: int,
        batch_invariant: bool = False,
        refeed_replies: bool = False,
        exact_limit: int | None = None,
        refeed_chunk: int = 0,
    ) -> None:
        self.backend = backend
        self.handle = handle
        self.cache = cache
        self.policy = policy
        self.keep_live = keep_live
        self.namespace = namespace
        self._post = post
        self._on_live = on_live
        #: G: the granularity prefixes are reused in (``LoadedModel.reuse_grid``); 1 for a
        #: backend whose cells do not depend on batching (any prefix is then reusable as
        #: computed) or that pads short chunks.
        self.grid = 1 if batch_invariant else grid
        self.batch_invariant = batch_invariant
        #: With padded chunks (``LoadedModel.fillers_fit_until``): prompt cells from here on
        #: may have been fed without fillers (no room for them before the context's end),
        #: so they are never kept or reused.
        self.exact_limit = exact_limit
        #: Free or pinned sequences still holding their last request's KV: (token bytes,
        #: fingerprint). Published through ``on_live`` after every change.
        self.live: dict[int, tuple[bytes, bytes]] = {}
        #: Live sequences whose last request computed more than its exact cells (its reply,
        #: its prompt's last partial cell): those tokens' whole grid cells (with padded
        #: chunks, all of them up to ``exact_limit``), to feed again while the model is idle
        #: (:meth:`refeed_next`), so that the next turn of the conversation restores them
        #: instead of prefilling them.
        self.refeed: dict[int, list[int]] = {}
        self.refeed_replies = refeed_replies and not batch_invariant
        #: Tokens fed again per call: the model's prompt chunk (``LoadedModel.chunk_rows``),
        #: which on the grid is one grid cell (fed at its grid position, as a cold prefill
        #: feeds it) and with padded chunks a whole chunk (computed exactly wherever it
        #: starts); G when not given.
        self.refeed_chunk = refeed_chunk or self.grid

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

        The prefix comes from a cache row (restored), from the sequence's own live KV, or
        nowhere (cold). **Only whole grid cells are kept** (see the module docstring): of
        the known prefix, the part up to the last multiple of G that leaves at least one
        prompt token to feed; the rest of the prompt is then fed in the grid's chunks, the
        same ``llama_decode`` calls the cold run made from there, so the cells, the logits
        and a greedy answer are bit for bit the cold run's. An exact hit re-feeds the last
        grid cell of the prompt (up to G tokens) for its logits: states carry none.
        """
        had_live = self.live.pop(seq, None) is not None
        self.refeed.pop(seq, None)
        if had_live:
            self._live_changed()
        prompt = track.prompt
        n_prompt = len(prompt)
        # At least one token to feed; with padded chunks, nothing past where fillers fit (a
        # row another engine saved on the grid may hold cells there that this one feeds in
        # another chunk).
        most = self._capped(n_prompt - 1)
        backend, handle = self.backend, self.handle
        start = 0
        exact = False
        if restore is not None:
            known = len(restore.tokens)
            start = self.grid_floor(min(known, most))
            if start == 0:
                # Less than one whole cell in common: nothing worth unpacking.
                self._post(self.cache.release, restore)
                restore = None
            else:
                exact = known == n_prompt
                try:
                    if had_live:
                        backend.seq_rm(handle, seq, 0, None)
                    backend.kv_unpack(handle, seq, restore.payload)
                    # A longer (covering) row, or cells past the grid: not the cold run's.
                    backend.seq_rm(handle, seq, start, None)
                except BackendError as exc:
                    self._post(self.cache.reject, restore, str(exc))
                    restore, had_live, track.live_len, start = None, True, 0, 0
                finally:
                    if restore is not None:
                        self._post(self.cache.release, restore)
        if restore is not None:
            track.hit = CacheHit(
                kind="exact" if exact else "partial",
                prefix_len=start,
                source=restore.source,
                tier=restore.tier,
            )
        elif track.live_len and (start := self.grid_floor(min(track.live_len, most))):
            backend.seq_rm(handle, seq, start, None)
            track.hit = CacheHit(
                kind="exact" if track.live_len == n_prompt else "partial",
                prefix_len=start,
                source="session" if track.session else "live",
            )
            self._post(self.cache.note_live_hit)
        else:
            start = 0
            backend.seq_rm(handle, seq, 0, None)
            track.hit = COLD
        track.context = list(prompt[:start])
        track.last_save_at = start
        point = cold_save_point(n_prompt, self.policy, self.grid) if self.cache.enabled else None
        return Setup(
            n_context=start,
            cursor=list(prompt[start:]),
            pause_at=point if point is not None and point > start else None,
        )

    # ---- in-flight sharing ------------------------------------------------------------------

    def share_point(self, track: KVTrack, leader: KVTrack, start: int) -> int:
        """How much of ``track``'s prompt it can take from ``leader``'s sequence once the
        leader has fed it: the whole grid cells of their common prompt prefix (leaving at
        least one token to feed, as every reuse does), or 0 when that is no more than the
        ``start`` the request already holds, or shorter than the policy's ``min_tokens``
        (a shared BOS or a few template tokens are not worth waiting for), or when they run
        under other fingerprints (an adapter, a ``cache_salt``: no tenant reads another's
        KV). Those cells of the leader are prompt cells fed on the grid, exactly what a cold
        prefill computes (module docstring)."""
        if leader.fingerprint != track.fingerprint:
            return 0
        common = common_prefix_tokens(encode_tokens(track.prompt), encode_tokens(leader.prompt))
        point = self.grid_floor(self._capped(min(common, len(track.prompt) - 1)))
        return point if point > start and point >= self.policy.min_tokens else 0

    def take(self, track: KVTrack, seq: int, leader_seq: int, n: int) -> bool:
        """Copy the first ``n`` cells of ``leader_seq`` into ``seq`` (which holds the
        request's own prefix so far), as a restore does: the leader's state packed and
        unpacked, then cut at ``n``. False, with ``seq`` cleared and the request cold, when
        the backend refuses (the request then feeds its whole prompt itself)."""
        backend, handle = self.backend, self.handle
        try:
            payload = backend.kv_pack(handle, leader_seq)
            backend.seq_rm(handle, seq, 0, None)
            backend.kv_unpack(handle, seq, payload)
            backend.seq_rm(handle, seq, n, None)
        except BackendError:
            log.warning(
                "taking %d shared cells from sequence %d failed", n, leader_seq, exc_info=True
            )
            backend.seq_rm(handle, seq, 0, None)
            track.context = []
            track.last_save_at = 0
            track.hit = COLD
            return False
        track.context = list(track.prompt[:n])
        track.last_save_at = n
        track.hit = CacheHit(kind="partial", prefix_len=n, source="shared")
        return True

    def _capped(self, n: int) -> int:
        """``n``, but no further than ``exact_limit``."""
        return n if self.exact_limit is None else min(n, self.exact_limit)

    def grid_floor(self, n: int) -> int:
        """``n`` rounded down to a whole number of grid cells."""
        return n // self.grid * self.grid

    def exact_len(self, track: KVTrack) -> int:
        """How many leading cells of ``track``'s sequence are what a cold prefill of any
        prompt starting with them computes: the whole grid cells of the prompt part. (The
        last partial cell was fed as a chunk shorter than G, and generated tokens one at a
        time: a prompt that goes on past them is computed in other chunks cold.)"""
        if self.batch_invariant:
            return len(track.context)
        return self.grid_floor(self._capped(min(len(track.context), len(track.prompt))))

    # ---- saves ------------------------------------------------------------------------------

    def save(
        self, track: KVTrack, seq: int, reason: SaveReason, *, force: bool = False
    ) -> SaveOrder | None:
        """Pack ``seq`` for a save of ``track.context``, if it holds exactly-computed cells
        only and the policy and the cache want it (``force``: whatever the policy's minimum
        length). A cold save happens at a grid point of the prompt; a request that has gone
        past its prompt's whole cells is saved by :meth:`finish` instead, trimmed.

        A row the cache already holds is not packed again (the order then carries only its
        key). A failing pack loses this save only: the KV is untouched, so the model serves
        on; it is logged and counted as dropped.
        """
        tokens = tuple(track.context)
        if not self.cache.enabled or not tokens or len(tokens) != self.exact_len(track):
            return None
        if not force and not passes_gate(len(tokens), reason, self.policy):
            return None
        order = self._pack(seq, tokens, track.fingerprint, reason)
        if order is not None:
            track.last_save_at = len(tokens)
        return order

    def finish(
        self, track: KVTrack, seq: int, reason: SaveReason, *, force: bool = False, keep: bool
    ) -> SaveOrder | None:
        """The request on ``seq`` ended: cut the sequence back to its exactly-computed
        cells (:meth:`exact_len`), save them (the finish row: what ``parent_key`` resumes
        from), and keep them live for the next prompt admitted there (always for a
        session's pinned sequence: ``keep``), or clear the sequence."""
        n = track.kept = self.exact_len(track)
        tokens = tuple(track.context[:n])
        self.backend.seq_rm(self.handle, seq, n, None)
        order = None
        if self.cache.enabled and tokens and (force or passes_gate(n, reason, self.policy)):
            order = self._pack(seq, tokens, track.fingerprint, reason)
        if (keep or self.keep_live) and tokens:
            self.live[seq] = (encode_tokens(tokens), track.fingerprint)
            rest = track.context[n : self.grid_floor(self._capped(len(track.context)))]
            if rest and self.refeed_replies:
                self.refeed[seq] = list(rest)
        else:
            self.backend.seq_rm(self.handle, seq, 0, None)
            self.live.pop(seq, None)
        self._live_changed()
        return order

    # ---- feeding a finished reply again ----------------------------------------------------

    def refeed_next(self, busy: Container[int]) -> tuple[int, list[int]] | None:
        """A free live sequence's next chunk to feed again (``refeed_chunk``), and the
        sequence."""
        for seq, rest in self.refeed.items():
            if seq not in busy and seq in self.live:
                return seq, rest[: self.refeed_chunk]
        return None

    def refed(self, seq: int, chunk: Sequence[int], reason: SaveReason) -> SaveOrder | None:
        """``chunk`` was fed into ``seq`` as one call (at its grid position, or padded): its
        cells are what a cold prefill computes there, so the live prefix grows by them. Once
        the whole reply is fed again, the sequence is saved (a row the next turn, or a
        restart, can restore), if the policy wants it."""
        tokens, fingerprint = self.live[seq]
        self.live[seq] = (tokens + encode_tokens(chunk), fingerprint)
        rest = self.refeed[seq][len(chunk) :]
        self._live_changed()
        if rest:
            self.refeed[seq] = rest
            return None
        del self.refeed[seq]
        n = len(self.live[seq][0]) // 4
        if not self.cache.enabled or not passes_gate(n, reason, self.policy):
            return None
        return self.save_live(seq, reason)

    def save_live(self, seq: int, reason: SaveReason) -> SaveOrder | None:
        """Save the live KV a free or pinned sequence holds (unconditionally): it holds
        exactly-computed cells only (:meth:`finish` cut it)."""
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

    def release(self, track: KVTrack, seq: int) -> None:
        """The request on ``seq`` failed: its KV is as before its failed step; keep its
        exactly-computed cells live (when ``keep_live_kv``), or clear the sequence."""
        n = self.exact_len(track)
        self.refeed.pop(seq, None)
        if self.keep_live and n:
            self.backend.seq_rm(self.handle, seq, n, None)
            self.live[seq] = (encode_tokens(track.context[:n]), track.fingerprint)
        else:
            self.backend.seq_rm(self.handle, seq, 0, None)
            self.live.pop(seq, None)
        self._live_changed()

    def forget(self, seq: int) -> None:
        """``seq``'s cells are no longer what ``live`` says (it failed, or was cleared)."""
        self.refeed.pop(seq, None)
        if self.live.pop(seq, None) is not None:
            self._live_changed()
