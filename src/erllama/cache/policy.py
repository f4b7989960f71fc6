"""Save-gate arithmetic of :class:`~erllama.config.CachePolicy` (pure functions)."""

from __future__ import annotations

from ..config import CachePolicy
from .port import SaveReason

__all__ = ["cold_save_point", "passes_gate", "wants_continued"]


def cold_save_point(n_prompt: int, policy: CachePolicy) -> int | None:
    """Where a prompt of ``n_prompt`` tokens gets its cold save, or None for no cold save.

    ``floor((n - trim) / align) * align``: the prompt's tail is trimmed because it is what
    re-tokenises differently when the next turn appends text, and the point is aligned so
    prompts sharing a long prefix (agents with one system prompt) land on the same row.
    """
    if not policy.cold_min_tokens <= n_prompt <= policy.cold_max_tokens:
        return None
    usable = n_prompt - policy.boundary_trim_tokens
    align = policy.boundary_align_tokens
    if usable < align:
        return None
    point = usable // align * align
    return point if point >= policy.min_tokens else None


def passes_gate(n_tokens: int, reason: SaveReason, policy: CachePolicy) -> bool:
    """Evict and shutdown saves are unconditional (state would be lost otherwise)."""
    if n_tokens <= 0:
        return False
    if reason in ("evict", "shutdown"):
        return True
    if reason == "finish" and not policy.save_finish:
        return False
    return n_tokens >= policy.min_tokens


def wants_continued(n_context: int, last_save_at: int, policy: CachePolicy) -> bool:
    return n_context - last_save_at >= policy.continued_interval and n_context >= policy.min_tokens
