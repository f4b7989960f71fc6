"""Discovery of pressure sources and the typed facade over their pluggy hook.

Sources come from the entry-point group ``erllama.pressure``. Registries are made by
:func:`make_pressure_registry`, never global: tests build a fresh one with
``autoload=False`` and register what they need.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import pluggy

from ..config import PressureConfig
from ..errors import ConfigError
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


def _instantiate(obj: Any) -> Any:
    # An entry point may name a module, an instance, or a class to instantiate with no args.
    return obj() if inspect.isclass(obj) else obj


class PressureSourceRegistry:
    """Source name -> :class:`SourcePlugin`, loading entry points lazily on first use."""

    def __init__(self, *, autoload: bool = True, group: str = PRESSURE_GROUP) -> None:
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        if autoload:
            for ep in importlib.metadata.entry_points(group=group):
                self._entry_points.setdefault(ep.name, ep)
        self._sources: dict[str, SourcePlugin] = {}

    def register(self, name: str, plugin: Any) -> SourcePlugin:
        """Register a plugin object (module, instance or class) under ``name``."""
        source = SourcePlugin(name, _instantiate(plugin))
        self._sources[name] = source
        return source

    def names(self) -> list[str]:
        return sorted(set(self._entry_points) | set(self._sources))

    def get(self, name: str) -> SourcePlugin:
        """The source called ``name``; ConfigError naming ``pressure.source`` if unknown."""
        if name in self._sources:
            return self._sources[name]
        ep = self._entry_points.get(name)
        if ep is None:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(
                [("pressure.source", f"unknown pressure source {name!r} (registered: {known})")]
            )
        try:
            plugin = ep.load()
        except Exception as exc:
            raise ConfigError(
                [("pressure.source", f"pressure source {name!r} failed to import: {exc}")]
            ) from exc
        return self.register(name, plugin)


def make_pressure_registry(
    plugins: Mapping[str, Any] | None = None, *, autoload: bool = True
) -> PressureSourceRegistry:
    """A fresh registry: entry points (unless ``autoload=False``) plus ``plugins`` by name."""
    registry = PressureSourceRegistry(autoload=autoload)
    for name, plugin in (plugins or {}).items():
        registry.register(name, plugin)
    return registry
