"""What travels between the ingress, the router and the replicas (pickled by Ray).

Requests are small attrs classes, not dicts: the router reads their fields, and Ray's own
``PrefixCacheAffinityRouter`` (a baseline in the benchmarks) needs a ``prompt`` attribute.
Every request may name a replica in ``pin`` (its Serve unique id), which the router honours
whatever its policy says: that is how one replica fetches a row from another.

Errors come back as values (:class:`Failed`), not raised through Ray: erllama's errors take
structured constructor arguments, which pickle cannot rebuild from the message, and Ray
would wrap them in its own types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ..cache.counters import CacheCounters
from ..config import ModelConfig
from ..errors import ErllamaError
from ..events import ModelInfo
from ..pressure import PressureStatus

__all__ = [
    "Accepted",
    "Description",
    "EmbedRequest",
    "ExportRequest",
    "Failed",
    "GenerateRequest",
    "LoadRequest",
    "Pin",
    "UnloadRequest",
    "unwrap",
]

T = TypeVar("T")


@attrs.define(eq=False)
class GenerateRequest:
    """One generation request: the prompt as token ids (tokenized once, by the ingress,
    with the model's own tokenizer) and its chain of block hashes for the router."""

    model: str
    tokens: tuple[int, ...]
    #: ``Engine.infer`` keyword arguments (max_tokens, temperature, stop, session_id ...).
    options: dict[str, Any] = attrs.Factory(dict)
    #: ``erllama.cluster.chain_hashes(tokens, block)``.
    chain: tuple[int, ...] = ()
    session_id: str | None = None
    pin: str | None = None
    #: Filled in by the router: replicas it knows hold a prefix of the prompt, and how many
    #: tokens of it (block-aligned). The replica that gets the request may fetch from one.
    holders: dict[str, int] = attrs.Factory(dict)
    #: Filled in by the router: replicas it sent a longer prefix of the prompt to than they
    #: have reported holding (they may still be prefilling it), with the tokens of it and
    #: the seconds until the router expects them to hold it.
    filling: dict[str, tuple[int, float]] = attrs.Factory(dict)

    @property
    def prompt(self) -> str:
        """The prompt as text for a character-prefix router (Ray's
        ``PrefixCacheAffinityRouter``): the token ids, space-separated, so a prefix of the
        text is a prefix of the tokens."""
        return " ".join(map(str, self.tokens))


@attrs.frozen
class Pin:
    """An argument for a call on one replica (or on whichever, with None)."""

    pin: str | None = None


@attrs.frozen
class ExportRequest:
    """Export the cache row holding the longest prefix of ``tokens`` (pinned to a holder)."""

    model: str
    tokens: tuple[int, ...]
    pin: str | None = None
    #: Wait up to ``wait_s`` for a row of at least ``min_tokens`` tokens (one the holder
    #: is still prefilling), then export the longest it has.
    min_tokens: int = 0
    wait_s: float = 0.0


@attrs.frozen
class EmbedRequest:
    model: str
    tokens: tuple[int, ...]
    pin: str | None = None


@attrs.frozen
class LoadRequest:
    model_id: str
    config: ModelConfig
    pin: str | None = None


@attrs.frozen
class UnloadRequest:
    model_id: str
    pin: str | None = None


@attrs.frozen
class Accepted:
    """A generation stream's first item: the request is queued on ``replica``."""

    replica: str
    #: Prompt tokens whose KV this replica fetched from another replica for the request.
    fetched_tokens: int = 0


@attrs.frozen
class Description:
    """A replica's models and counters, for the ingress's fleet view."""

    replica: str
    models: tuple[ModelInfo, ...]
    counters: CacheCounters
    pressure: PressureStatus


@attrs.frozen
class Failed:
    """An erllama error carried by value: its class, ``args`` and attributes."""

    kind: type[ErllamaError]
    args: tuple[Any, ...]
    fields: Mapping[str, Any]

    @classmethod
    def of(cls, exc: ErllamaError) -> Failed:
        fields = {k: v for k, v in vars(exc).items() if not k.startswith("__")}
        return cls(type(exc), exc.args, fields)

    def error(self) -> ErllamaError:
        """The error again, as the replica raised it (without its ``__cause__``)."""
        exc = self.kind.__new__(self.kind)
        exc.args = self.args
        exc.__dict__.update(self.fields)
        return exc


def unwrap(value: T | Failed) -> T:
    """``value``, or raise the error it carries."""
    if isinstance(value, Failed):
        raise value.error()
    return value
