"""Plugin discovery and the typed facade over pluggy's untyped hook calls.

Backends come from the entry-point group ``erllama.backends``; the built-in ``stub`` and
``llama_cpp`` are registered there by our own pyproject, exactly like a third party's. Each
backend gets its own :class:`pluggy.PluginManager`, so every hook has at most one
implementation and capability checks ask whether a hookimpl exists.

Registries are made by :func:`make_backend_registry`, never global: tests build a fresh one
with ``autoload=False`` and register what they need.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import pluggy

from .backends import hookspecs
from .backends.types import ChatMessage, LoadedModel, StepOp, StepResult
from .config import ModelConfig
from .errors import BackendError, ConfigError, ErllamaError, NotSupported
from .sampling import SamplerParams

__all__ = ["Backend", "BackendRegistry", "EntryPointRegistry", "make_backend_registry"]

BACKEND_GROUP = "erllama.backends"
P = TypeVar("P")


def _instantiate(obj: Any) -> Any:
    # An entry point may name a module, an instance, or a class to instantiate with no args.
    return obj() if inspect.isclass(obj) else obj


class Backend:
    """One backend plugin behind typed methods.

    Every method wraps foreign exceptions in :class:`BackendError` (cause kept); erllama's own
    errors raised by a plugin (InvalidRequest for a bad grammar, say) pass through unchanged.
    """

    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin
        self._pm = pluggy.PluginManager("erllama")
        self._pm.add_hookspecs(hookspecs.ModelBackend)
        self._pm.register(plugin, name=name)
        # A misspelt hook name would otherwise be silently ignored.
        self._pm.check_pending()
        missing = [h for h in hookspecs.REQUIRED_HOOKS if not self._implemented(h)]
        if missing:
            raise ConfigError(
                [("backend", f"plugin {name!r} lacks required hooks: {', '.join(missing)}")]
            )
        self.capabilities = frozenset(
            cap
            for cap, hooks in hookspecs.OPTIONAL_CAPABILITIES.items()
            if all(self._implemented(h) for h in hooks)
        )
        # The per-step hooks skip pluggy's dispatch: each has exactly one implementation.
        self._step_fn = _direct(self._pm, "step", ("model", "ops", "on_sampled"))
        self._detokenize_fn = _direct(self._pm, "detokenize", ("model", "tokens", "special"))

    def _implemented(self, hook: str) -> bool:
        return bool(getattr(self._pm.hook, hook).get_hookimpls())

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise NotSupported(self.name, capability)

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._pm.hook, operation)(**kwargs)
        except ErllamaError:
            raise
        except Exception as exc:
            raise BackendError(self.name, operation, f"{type(exc).__name__}: {exc}") from exc

    # The hot path: called once per step / per new token, without hook dispatch -----------

    def direct_step(
        self,
        model: Any,
        ops: Sequence[StepOp],
        on_sampled: Callable[[int, int], None] | None,
    ) -> Sequence[StepResult]:
        """:meth:`step`, calling the implementation directly."""
        try:
            result: Sequence[StepResult] = self._step_fn(model, ops, on_sampled)
        except ErllamaError:
            raise
        except Exception as exc:
            raise BackendError(self.name, "step", f"{type(exc).__name__}: {exc}") from exc
        return result

    def direct_detokenize(self, model: Any, tokens: Sequence[int]) -> bytes:
        """:meth:`detokenize`, calling the implementation directly."""
        try:
            return bytes(self._detokenize_fn(model, tokens, False))
        except ErllamaError:
            raise
        except Exception as exc:
            raise BackendError(self.name, "detokenize", f"{type(exc).__name__}: {exc}") from exc

    # Required hooks -------------------------------------------------------------------------

    def load(self, config: ModelConfig) -> LoadedModel:
        loaded = self._call("load", config=config)
        if not isinstance(loaded, LoadedModel):
            raise BackendError(self.name, "load", f"returned {type(loaded).__name__}")
        return loaded

    def free(self, model: Any) -> None:
        self._call("free", model=model)

    def tokenize(
        self, model: Any, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        out = self._call(
            "tokenize",
            model=model,
            text=text,
            add_special=add_special,
            parse_special=parse_special,
        )
        return list(out)

    def detokenize(self, model: Any, tokens: Sequence[int], special: bool = False) -> bytes:
        return bytes(self._call("detokenize", model=model, tokens=tokens, special=special))

    def step(
        self,
        model: Any,
        ops: Sequence[StepOp],
        on_sampled: Callable[[int, int], None] | None = None,
    ) -> Sequence[StepResult]:
        result: Sequence[StepResult] = self._call(
            "step", model=model, ops=ops, on_sampled=on_sampled
        )
        return result

    def kv_pack(self, model: Any, seq: int) -> bytes | bytearray:
        # A multi-MB state is not copied again here: bytes and bytearray are both fine.
        data = self._call("kv_pack", model=model, seq=seq)
        return data if isinstance(data, bytes | bytearray) else bytes(data)

    def kv_unpack(self, model: Any, seq: int, data: bytes | bytearray | memoryview) -> None:
        self._call("kv_unpack", model=model, seq=seq, data=data)

    def seq_rm(self, model: Any, seq: int, start: int, end: int | None = None) -> None:
        self._call("seq_rm", model=model, seq=seq, start=start, end=end)

    # Optional hooks -------------------------------------------------------------------------

    def apply_chat_template(
        self,
        model: Any,
        messages: Sequence[ChatMessage],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool = True,
        verbatim: Sequence[tuple[str, Sequence[int]]] = (),
    ) -> list[int]:
        self.require("chat_template")
        return list(
            self._call(
                "apply_chat_template",
                model=model,
                messages=messages,
                system=system,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                verbatim=verbatim,
            )
        )

    def embed(self, model: Any, tokens: Sequence[int]) -> list[float]:
        self.require("embed")
        return [float(x) for x in self._call("embed", model=model, tokens=tokens)]

    def sampler_new(self, model: Any, params: SamplerParams) -> Any:
        self.require("sampler")
        return self._call("sampler_new", model=model, params=params)

    def sampler_free(self, model: Any, sampler: Any) -> None:
        if self._implemented("sampler_free"):
            self._call("sampler_free", model=model, sampler=sampler)

    def adapter_load(self, model: Any, path: str) -> Any:
        self.require("adapters")
        return self._call("adapter_load", model=model, path=path)

    def adapter_free(self, model: Any, adapter: Any) -> None:
        self.require("adapters")
        self._call("adapter_free", model=model, adapter=adapter)

    def adapters_apply(self, model: Any, adapters: Sequence[tuple[Any, float]]) -> None:
        self.require("adapters")
        self._call("adapters_apply", model=model, adapters=adapters)

    def metadata(self, model: Any) -> Mapping[str, str]:
        if not self.supports("metadata"):
            return {}
        return dict(self._call("metadata", model=model) or {})


def _direct(pm: pluggy.PluginManager, hook: str, params: tuple[str, ...]) -> Callable[..., Any]:
    """The one implementation of ``hook``, callable with ``params`` positionally.

    pluggy lets an implementation take a subset of a hook's arguments, in any order, by name:
    adapt such a one once here instead of on every call.
    """
    (impl,) = getattr(pm.hook, hook).get_hookimpls()
    fn: Callable[..., Any] = impl.function
    names = tuple(impl.argnames)
    if names == params:
        return fn
    order = [params.index(n) for n in names]
    return lambda *args: fn(*[args[i] for i in order])


class EntryPointRegistry(Generic[P]):
    """Plugin name -> wrapped plugin, loading entry points of ``group`` lazily on first use.

    ``wrap(name, plugin)`` builds the typed facade (``Backend``, a pressure ``SourcePlugin``);
    unknown or unimportable names raise ConfigError naming ``config_path``.
    """

    def __init__(
        self,
        group: str,
        wrap: Callable[[str, Any], P],
        *,
        autoload: bool,
        config_path: str,
        noun: str,
    ) -> None:
        self._wrap = wrap
        self._config_path = config_path
        self._noun = noun
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        if autoload:
            for ep in importlib.metadata.entry_points(group=group):
                self._entry_points.setdefault(ep.name, ep)
        self._plugins: dict[str, P] = {}

    def register(self, name: str, plugin: Any) -> P:
        """Register a plugin object (module, instance, or class to instantiate) as ``name``."""
        wrapped = self._wrap(name, _instantiate(plugin))
        self._plugins[name] = wrapped
        return wrapped

    def names(self) -> list[str]:
        return sorted(set(self._entry_points) | set(self._plugins))

    def get(self, name: str) -> P:
        if name in self._plugins:
            return self._plugins[name]
        ep = self._entry_points.get(name)
        if ep is None:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(
                [(self._config_path, f"unknown {self._noun} {name!r} (registered: {known})")]
            )
        try:
            plugin = ep.load()
        except Exception as exc:
            raise ConfigError(
                [(self._config_path, f"{self._noun} {name!r} failed to import ({ep.value}): {exc}")]
            ) from exc
        return self.register(name, plugin)

    def register_all(self, plugins: Mapping[str, Any] | None) -> None:
        for name, plugin in (plugins or {}).items():
            self.register(name, plugin)


class BackendRegistry(EntryPointRegistry[Backend]):
    """Backend name -> :class:`Backend`, from the ``erllama.backends`` entry points."""

    def __init__(self, *, autoload: bool = True, group: str = BACKEND_GROUP) -> None:
        super().__init__(group, Backend, autoload=autoload, config_path="backend", noun="backend")


def make_backend_registry(
    plugins: Mapping[str, Any] | None = None, *, autoload: bool = True
) -> BackendRegistry:
    """A fresh registry: entry points (unless ``autoload=False``) plus ``plugins`` by name."""
    registry = BackendRegistry(autoload=autoload)
    registry.register_all(plugins)
    return registry
