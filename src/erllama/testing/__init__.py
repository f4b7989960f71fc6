"""Test helpers for erllama users and backend authors (needs pytest and anyio's plugin)."""

from .conformance import BackendConformance as BackendConformance

__all__ = ["BackendConformance"]
