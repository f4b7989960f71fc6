"""One request inside a model: what was asked, and the parts that track it.

A :class:`Request` is an aggregate of single-purpose parts, each with one owner:

* ``spec``: what the caller asked for (frozen, built by intake on the event loop);
* ``job``: its scheduling state (:mod:`.scheduler`, which writes it; the job also holds the
  request's backend sampler, freed by whichever side ends the job);
* ``kv``: its cache bookkeeping (:mod:`.kv`; model thread);
* ``output``, ``generated``, ``reply_text``: its tokens and their events (:mod:`.output`;
  model thread);
* ``clock``: timestamps for its :class:`~erllama.events.Stats` (model thread);
* ``saves``: what the cache did with its saves (event loop);
* ``probe``: what the model held near the prompt at the lookup (event loop, then read by
  the thread when it sets the sequence up: the restore command orders the two);
* ``channel``, ``scope``, ``finished``: its stream and cancel scope (event loop).

Each part has one writer. The loop reads thread-owned parts only after the request has
ended (the terminal event is handed over after the thread's last write to them).
"""

from __future__ import annotations

import time

import anyio
import attrs

from ..events import CacheDelta, FinishReason, Stats
from ..sampling import SamplerParams
from ..stream import Channel
from .explain import Probe
from .kv import KVTrack
from .output import Output
from .scheduler import Job

__all__ = ["Clock", "Request", "RequestSpec", "SaveTally"]


@attrs.frozen(kw_only=True)
class RequestSpec:
    """What the caller asked for, validated."""

    prompt: tuple[int, ...]
    params: SamplerParams
    #: None: until end of generation or a full context; 0: prefill only.
    max_tokens: int | None
    parent_key: bytes | None
    stop: tuple[str, ...] = ()
    thinking: bool = False
    thinking_budget: int | None = None
    session: str | None = None
    logprobs: int | None = None
    #: Only requests with the same salt share cache rows and live KV (``cache.key.salted``).
    cache_salt: str | None = None


@attrs.define(eq=False)
class SaveTally:
    """What the cache did with a request's saves (event loop only)."""

    #: Tokens this request newly saved beyond what it read.
    created: int = 0
    finish_key: str | None = None


@attrs.define(eq=False)
class Clock:
    """Monotonic timestamps of one request's life."""

    queued: float = attrs.Factory(time.monotonic)
    admitted: float | None = None
    #: The prompt's known prefix was in place (lookup and restore, or live reuse, done).
    set_up: float | None = None
    #: A follower took its shared prefix from its leader (or stopped waiting for it).
    shared: float | None = None
    prefill_done: float | None = None
    first_token: float | None = None

    def stats(
        self,
        spec: RequestSpec,
        kv: KVTrack,
        saves: SaveTally,
        reason: FinishReason,
        generated: list[int],
        stop_sequence: str | None = None,
    ) -> Stats:
        now = time.monotonic()
        admitted = self.admitted if self.admitted is not None else now
        prefill_end = self.prefill_done or now
        gen_s = max(0.0, now - prefill_end) if self.prefill_done else 0.0
        n = len(generated)
        return Stats(
            prompt_tokens=len(spec.prompt),
            completion_tokens=n,
            cache_hit_kind=kv.hit.kind,
            cache_delta=CacheDelta(read=kv.hit.prefix_len, created=saves.created),
            finish_reason=reason,
            finish_key=saves.finish_key,
            time_to_first_token_s=(
                self.first_token - admitted if self.first_token is not None else None
            ),
            queued_s=admitted - self.queued,
            setup_s=(self.set_up - admitted) if self.set_up is not None else 0.0,
            shared_wait_s=(
                self.shared - self.set_up
                if self.shared is not None and self.set_up is not None
                else 0.0
            ),
            prefill_s=max(0.0, prefill_end - admitted) if self.admitted else 0.0,
            generation_s=gen_s,
            tokens_per_s=(n / gen_s) if n and gen_s > 0 else None,
            context_tokens=len(kv.context),
            seed=spec.params.seed,
            stop_sequence=stop_sequence,
            cancelled=reason == "cancelled",
            cache_explain=kv.explain,
        )


@attrs.define(eq=False)
class Request:
    """See the module docstring."""

    ref: str
    spec: RequestSpec
    job: Job[Request]
    kv: KVTrack
    output: Output
    #: Every token the model generated for it (not the end-of-generation token), and their
    #: exact text once it ended (None when it is not valid UTF-8: cut mid-character).
    generated: list[int] = attrs.Factory(list)
    reply_text: str | None = None
    clock: Clock = attrs.Factory(Clock)
    saves: SaveTally = attrs.Factory(SaveTally)
    #: What the model held near the prompt at its lookup (event loop; written before the
    #: restore command is sent, read by the thread once it runs it).
    probe: Probe | None = None
    channel: Channel = attrs.Factory(Channel)
    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    finished: anyio.Event = attrs.Factory(anyio.Event)
