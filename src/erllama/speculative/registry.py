"""Discovery of drafters and the typed facade over their pluggy hook.

Drafters come from the entry-point group ``erllama.drafters``. Registries are made by
:func:`make_drafter_registry`, never global: tests build a fresh one with
``autoload=False`` and register what they need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pluggy

from ..backends.types import LoadedModel
from ..config import SpeculativeConfig
from ..errors import ConfigError
from ..plugins import EntryPointRegistry
from . import hookspecs
from .hookspecs import Drafter

__all__ = ["DRAFTER_GROUP", "DrafterPlugin", "DrafterRegistry", "make_drafter_registry"]

DRAFTER_GROUP = "erllama.drafters"


class DrafterPlugin:
    """One drafter plugin behind a typed :meth:`new`."""

    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs.DrafterSource)
        self._pm.register(plugin, name=name)
        self._pm.check_pending()  # a misspelt hook name would be silently ignored
        if not self._pm.hook.drafter_new.get_hookimpls():
            raise ConfigError(
                [("speculative.drafter", f"plugin {name!r} does not implement 'drafter_new'")]
            )

    def load(self, config: SpeculativeConfig, model: LoadedModel) -> Any:
        """The plugin's per-model state (None when it keeps none). ConfigError when it
        cannot serve the model."""
        hook = self._pm.hook.drafter_load
        if not hook.get_hookimpls():
            return None
        try:
            return hook(config=config, model=model)
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError([("speculative", f"drafter {self.name!r}: {exc}")]) from exc

    def free(self, state: Any) -> None:
        hook = self._pm.hook.drafter_free
        if state is not None and hook.get_hookimpls():
            hook(state=state)

    def new(self, config: SpeculativeConfig, state: Any = None) -> Drafter:
        """A drafter for one request. ConfigError when the plugin refuses the settings or
        returns something without a ``draft`` method."""
        try:
            drafter = self._pm.hook.drafter_new(config=config, state=state)
        except (ValueError, TypeError) as exc:
            raise ConfigError([("speculative", f"drafter {self.name!r}: {exc}")]) from exc
        if not callable(getattr(drafter, "draft", None)):
            raise ConfigError(
                [("speculative.drafter", f"plugin {self.name!r} returned no drafter")]
            )
        return drafter  # type: ignore[no-any-return]


class DrafterRegistry(EntryPointRegistry[DrafterPlugin]):
    """Drafter name -> :class:`DrafterPlugin`, from the ``erllama.drafters`` entry points."""

    def __init__(self, *, autoload: bool = True, group: str = DRAFTER_GROUP) -> None:
        super().__init__(
            group, DrafterPlugin, autoload=autoload, config_path="speculative.drafter",
            noun="drafter",
        )  # fmt: skip


def make_drafter_registry(
    plugins: Mapping[str, Any] | None = None, *, autoload: bool = True
) -> DrafterRegistry:
    """A fresh registry: entry points (unless ``autoload=False``) plus ``plugins`` by name."""
    registry = DrafterRegistry(autoload=autoload)
    registry.register_all(plugins)
    return registry
