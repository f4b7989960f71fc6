"""Save-gate arithmetic of :class:`~erllama.config.CachePolicy` (pure functions)."""

from __future__ import annotations

from ..config import CachePolicy
from .port import SaveReason

__all__ = ["cold_save_point", "passes_gate"]


def cold_save_point(n_prompt: int, policy: CachePolicy, grid: int = 1) -> int | None:
    """Where a prompt of ``n_prompt`` tokens gets its cold save, or None for no cold save.

    ``floor((n - trim) / align) * align``, then down to a multiple of ``grid`` (the model's
    prefill grid: a row must end on it to be restored exactly): the prompt's tail is trimmed
    because it is what re-tokenises differently when the next turn appends text, and the
    point is aligned so prompts sharing a long prefix (agents with one system prompt) land on
    the same row.
    """
    if not policy.cold_min_tokens <= n_prompt <= policy.cold_max_tokens:
        return None
    usable = n_prompt - policy.boundary_trim_tokens
    align = policy.boundary_align_tokens
    if usable < align:
        return None
    point = usable // align * align // grid * grid
    return point if point >= policy.min_tokens and point > 0 else None


def passes_gate(n_tokens: int, reason: SaveReason, policy: CachePolicy) -> bool:
    """Evict and shutdown saves are unconditional (state would be lost otherwise)."""
    if n_tokens <= 0:
        return False
    if reason in ("evict", "shutdown"):
        return True
    if reason == "finish" and not policy.save_finish:
        return False
    return n_tokens >= policy.min_tokens
