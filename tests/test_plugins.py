"""Backend discovery by entry point, capability checks, and the conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

import erllama
from erllama.backends import hookimpl, stub
from erllama.plugins import make_backend_registry
from erllama.testing import BackendConformance

pytestmark = pytest.mark.anyio


def test_builtin_and_out_of_tree_backends_are_discovered_by_entry_point() -> None:
    registry = make_backend_registry()
    assert {"stub", "llama_cpp", "parrot"} <= set(registry.names())
    assert registry.get("stub").capabilities == {
        "chat_template", "embed", "sampler", "adapters", "metadata",
    }  # fmt: skip
    assert registry.get("parrot").capabilities == frozenset()


def test_the_builtin_drafters_are_discovered_by_entry_point() -> None:
    from erllama.speculative import make_drafter_registry

    registry = make_drafter_registry()
    assert {"ngram", "model"} <= set(registry.names())
    drafter = registry.get("ngram").new(erllama.SpeculativeConfig())
    assert drafter.draft([5, 1, 2, 3, 9, 1], 2, 4) == [3, 9, 1, 2]


def test_a_fresh_registry_without_autoload_knows_only_what_it_is_given() -> None:
    registry = make_backend_registry({"stub": stub}, autoload=False)
    assert registry.names() == ["stub"]
    with pytest.raises(erllama.ConfigError):
        registry.get("parrot")


def test_a_plugin_missing_required_hooks_is_refused() -> None:
    class Half:
        @hookimpl
        def tokenize(self, model: object, text: str) -> list[int]:
            return []

    with pytest.raises(erllama.ConfigError, match="lacks required hooks"):
        make_backend_registry({"half": Half()}, autoload=False)


def test_a_misspelt_hook_is_caught() -> None:
    import pluggy

    class Typo:
        @hookimpl
        def tokenise(self, model: object) -> None: ...

    with pytest.raises(pluggy.PluginValidationError):
        make_backend_registry({"typo": Typo()}, autoload=False)


async def test_out_of_tree_plugin_serves_through_the_engine(tmp_path: Path) -> None:
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    # Default registry: discovery through the installed package's entry point.
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("p", erllama.ModelConfig(backend="parrot", n_ctx=256))
        result = await engine.complete(mid, "polly wants a cracker", max_tokens=12)
        # Each token echoes the one halfway back through the context (bytes, offset by 3).
        assert (result.text, result.finish_reason) == ("ss  aa  ccrr", "length")
        assert engine.model_info(mid).capabilities == frozenset()
        for call, capability in (
            (
                lambda: engine.apply_chat_template(mid, [{"role": "user", "content": "x"}]),
                "chat_template",
            ),
            (lambda: engine.embed(mid, "x"), "embed"),
            (lambda: engine.infer(mid, "x", temperature=0.5), "sampler"),
            (lambda: engine.infer(mid, "x", grammar='root ::= "a"'), "grammar"),
            (lambda: engine.infer(mid, "x", logit_bias={1: 5.0}), "sampler"),
            (lambda: engine.infer(mid, "x", frequency_penalty=0.5), "sampler"),
            (lambda: engine.infer(mid, "x", logprobs=2), "logprobs"),
            (lambda: engine.load_adapter(mid, str(tmp_path / "a.gguf")), "adapters"),
            (lambda: engine.set_adapter_scale(mid, 1, 1.0), "adapters"),
            (lambda: engine.unload_adapter(mid, 1), "adapters"),
        ):
            with pytest.raises(erllama.NotSupported) as exc:
                await call()
            assert exc.value.backend == "parrot"
            assert exc.value.capability == capability
        assert engine.list_adapters(mid) == []


class TestStubConformance(BackendConformance):
    @pytest.fixture
    def backend_plugin(self) -> object:
        return stub

    @pytest.fixture
    def model_config(self) -> erllama.ModelConfig:
        return erllama.ModelConfig(backend="stub", n_ctx=256)


class TestParrotConformance(BackendConformance):
    @pytest.fixture
    def backend_plugin(self) -> object:
        import erllama_parrot

        return erllama_parrot

    @pytest.fixture
    def model_config(self) -> erllama.ModelConfig:
        return erllama.ModelConfig(backend="parrot", n_ctx=256)
