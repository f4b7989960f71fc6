"""Discovery of pressure sources and the typed facade over their pluggy hook.

Sources come from the entry-point group ``erllama.pressure``. Registries are made by
:func:`make_pressure_registry`, never global: tests build a fresh one with
``autoload=False`` and register what they need.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import pluggy

from ..config import PressureConfig
from ..errors import ConfigError
from ..plugins import EntryPointRegistry
from . import hookspecs
from .types import PressureSample, coerce_sample

__all__ = ["PRESSURE_GROUP", "PressureSourceRegistry", "SourcePlugin", "make_pressure_registry"]

PRESSURE_GROUP = "erllama.pressure"

log = logging.getLogger("erllama.pressure")


class SourcePlugin:
    """One pressure source behind a typed, never-raising :meth:`sample`."""

    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs.PressureSource)
        self._pm.register(plugin, name=name)
        # A misspelt hook name would otherwise be silently ignored.
        self._pm.check_pending()
        if not self._pm.hook.sample.get_hookimpls():
            raise ConfigError(
                [("pressure.source", f"plugin {name!r} does not implement the 'sample' hook")]
            )
        self._last_error: str | None = None

    async def sample(self, config: PressureConfig) -> PressureSample:
        """Read the source now. Never raises (except cancellation): a missing tool, a timeout,
        an exception or a reading that cannot be true all give an unavailable sample, logged
        as a warning when the source becomes unavailable (or its reason changes)."""
        raw: Any = None
        try:
            with anyio.move_on_after(config.sample_timeout_s) as scope:
                raw = self._pm.hook.sample(config=config)
                if inspect.isawaitable(raw):
                    raw = await raw
        except Exception as exc:
            sample = PressureSample.unavailable(f"{type(exc).__name__}: {exc}")
        else:
            if scope.cancelled_caught:
                sample = PressureSample.unavailable(
                    f"no reading within {config.sample_timeout_s:g} s"
                )
            else:
                try:
                    sample = coerce_sample(raw, self.name)
                except ValueError as exc:
                    sample = PressureSample.unavailable(f"implausible reading: {exc}")
        sample = attrs.evolve(sample, source=self.name, taken_at=anyio.current_time())
        self._note(sample)
        return sample

    def _note(self, sample: PressureSample) -> None:
        # One warning per change of state, not one every interval while a GPU is absent.
        if sample.error is not None:
            if sample.error != self._last_error:
                log.warning("pressure source %r unavailable: %s", self.name, sample.error)
            else:
                log.debug("pressure source %r still unavailable: %s", self.name, sample.error)
        elif self._last_error is not None:
            log.info("pressure source %r available again", self.name)
        self._last_error = sample.error


class PressureSourceRegistry(EntryPointRegistry[SourcePlugin]):
    """Source name -> :class:`SourcePlugin`, from the ``erllama.pressure`` entry points."""

    def __init__(self, *, autoload: bool = True, group: str = PRESSURE_GROUP) -> None:
        super().__init__(
            group, SourcePlugin, autoload=autoload, config_path="pressure.source",
            noun="pressure source",
        )  # fmt: skip


def make_pressure_registry(
    plugins: Mapping[str, Any] | None = None, *, autoload: bool = True
) -> PressureSourceRegistry:
    """A fresh registry: entry points (unless ``autoload=False``) plus ``plugins`` by name."""
    registry = PressureSourceRegistry(autoload=autoload)
    registry.register_all(plugins)
    return registry
