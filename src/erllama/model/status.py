"""What a model looks like from outside, read without waiting for its thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..events import ModelInfo, ModelStatus

if TYPE_CHECKING:
    from .worker import ModelWorker

__all__ = ["StatusView"]


class StatusView:
    """Snapshots of one model: phase, queue, load, and its ``ModelInfo``. The scheduler is
    read under the worker's lock (held by the thread for microseconds at a time)."""

    def __init__(self, worker: ModelWorker) -> None:
        self.w = worker

    @property
    def status(self) -> ModelStatus:
        sched = self.w.thread.sched
        if self.w.state != "idle" or sched is None:
            return self.w.state
        with self.w.lock:
            return sched.phase

    @property
    def queue_len(self) -> int:
        sched = self.w.thread.sched
        if sched is None:
            return 0
        with self.w.lock:
            return sched.waiting

    @property
    def load(self) -> int:
        """Requests queued or admitted."""
        sched = self.w.thread.sched
        if sched is None:
            return 0
        with self.w.lock:
            return sched.waiting + len(sched.admitted)

    @property
    def idle(self) -> bool:
        """Nothing admitted, queued, or being changed: safe to unload under pressure."""
        sched = self.w.thread.sched
        if sched is None or self.w.state != "idle":
            return False
        with self.w.lock:
            return not sched.busy

    def info(self) -> ModelInfo:
        loaded = self.w.loaded
        sched = self.w.thread.sched
        markers = self.w.thread.markers
        adapters = self.w.thread.adapters
        with self.w.lock:
            running = len(sched.admitted) if sched is not None else 0
            queued = sched.waiting if sched is not None else 0
            n_seq = sched.n_seq if sched is not None else self.w.config.n_seq_max
        return ModelInfo(
            id=self.w.id,
            backend=self.w.backend.name,
            status=self.status,
            model_path=str(self.w.config.model_path) if self.w.config.model_path else None,
            capabilities=self.w.backend.capabilities,
            n_ctx=loaded.n_ctx if loaded else 0,
            n_seq_max=n_seq,
            n_vocab=loaded.n_vocab if loaded else 0,
            queue_len=queued,
            running=running,
            fingerprint=self.w.fingerprint.hex(),
            effective_fingerprint=(adapters.fingerprint if adapters else self.w.fingerprint).hex(),
            quant=self.w.quant_label(),
            last_cache_hit=self.w.last_hit,
            loaded_at=self.w.loaded_at,
            last_used=self.w.last_used,
            adapters=self.w.adapters.list_adapters(),
            sessions=self.w.thread.sessions.info,
            thinking_markers=_pair(markers.think_start, markers.think_end),
            tool_call_markers=_pair(markers.tool_start, markers.tool_end),
            error=str(self.w.error) if self.w.error is not None else None,
            metadata=dict(loaded.metadata) if loaded else {},
        )


def _pair(start: bytes, end: bytes) -> tuple[str, str] | None:
    return (start.decode("utf-8"), end.decode("utf-8")) if start and end else None
