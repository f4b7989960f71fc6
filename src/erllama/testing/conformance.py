"""A conformance suite any backend plugin can run against itself.

Subclass :class:`BackendConformance` in a test module and provide two fixtures::

    from erllama.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_plugin(self):
            return my_package.backend        # the object your entry point names

        @pytest.fixture
        def model_config(self):
            return erllama.ModelConfig(backend="mine", model_path=..., n_ctx=256)

The suite needs pytest and anyio's pytest plugin (it runs on whatever ``anyio_backend``
your tests parametrise). It checks the required hooks through the real engine, that greedy
decoding is deterministic (set ``deterministic = False`` to skip that promise), that a packed
state restored into a fresh sequence continues exactly like the unbroken run, that a state
saved into each cache tier (``ram``, ``ram_file``, ``disk``; the file tiers in ``tmp_path``)
comes back as a warm hit with the cold run's output (the file tiers in a restarted engine,
whose ``kv_unpack`` then gets a ``memoryview``), that bad input gets typed errors, and that
every optional capability the backend does not declare raises
:class:`~erllama.errors.NotSupported` naming the backend and capability.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from ..backends.types import Decode, Prefill, Sampled
from ..config import CacheConfig, CachePolicy, EngineConfig, ModelConfig
from ..engine import Engine, open_engine
from ..errors import InvalidRequest, NotSupported
from ..plugins import Backend, make_backend_registry

__all__ = ["BackendConformance"]

NAME = "under_test"

#: Saves even a short prompt: a cold save one token short of the prompt (trim 1, align 1), so
#: the next request restores all but its last token from the row.
SAVE_EARLY = CachePolicy(
    min_tokens=1, cold_min_tokens=2, boundary_trim_tokens=1, boundary_align_tokens=1
)


def _tier_only(tier: str, root: Path) -> CacheConfig:
    """A cache whose saves land in ``tier`` and nowhere else (never the real /dev/shm)."""
    return CacheConfig(
        ram_bytes=64 << 20 if tier == "ram" else 0,
        ram_file_dir=root / "ram_file" if tier == "ram_file" else None,
        disk_dir=root / "disk" if tier == "disk" else None,
        policy=SAVE_EARLY,
    )


class BackendConformance:
    """Mix-in test class; see the module docstring."""

    pytestmark = pytest.mark.anyio
    #: Greedy decoding of the same prompt gives the same tokens.
    deterministic: bool = True
    prompt: str = "The quick brown fox jumps over the lazy dog"

    @pytest.fixture
    def backend_plugin(self) -> Any:
        raise NotImplementedError("provide a backend_plugin fixture")

    @pytest.fixture
    def model_config(self) -> ModelConfig:
        raise NotImplementedError("provide a model_config fixture")

    @pytest.fixture
    def backend(self, backend_plugin: Any) -> Backend:
        return make_backend_registry({NAME: backend_plugin}, autoload=False).get(NAME)

    @pytest.fixture
    async def conformance_engine(
        self, backend_plugin: Any, model_config: ModelConfig
    ) -> AsyncIterator[tuple[Engine, str]]:
        registry = make_backend_registry({NAME: backend_plugin}, autoload=False)
        config = EngineConfig(cache=CacheConfig(enabled=False, ram_file_dir=None))
        async with open_engine(config, backends=registry) as engine:
            mid = await engine.load_model("m", attrs.evolve(model_config, backend=NAME))
            yield engine, mid

    # ---- required behaviour ---------------------------------------------------------------

    async def test_tokenize_gives_ids_inside_the_vocabulary(
        self, conformance_engine: tuple[Engine, str]
    ) -> None:
        engine, mid = conformance_engine
        ids = await engine.tokenize(mid, self.prompt)
        n_vocab = engine.model_info(mid).n_vocab
        assert ids, "tokenize returned nothing"
        assert all(0 <= t < n_vocab for t in ids)
        assert isinstance(await engine.detokenize(mid, ids), str)

    async def test_complete_respects_max_tokens(
        self, conformance_engine: tuple[Engine, str]
    ) -> None:
        engine, mid = conformance_engine
        result = await engine.complete(mid, self.prompt, max_tokens=4)
        assert 1 <= len(result.token_ids) <= 4
        assert result.finish_reason in ("length", "stop")
        if result.finish_reason == "length":
            assert len(result.token_ids) == 4

    async def test_greedy_is_deterministic(self, conformance_engine: tuple[Engine, str]) -> None:
        if not self.deterministic:
            pytest.skip("backend does not promise deterministic greedy decoding")
        engine, mid = conformance_engine
        first = await engine.complete(mid, self.prompt, max_tokens=8)
        second = await engine.complete(mid, self.prompt, max_tokens=8)
        assert first.token_ids == second.token_ids

    async def test_restored_state_continues_like_the_unbroken_run(
        self, backend: Backend, model_config: ModelConfig
    ) -> None:
        if not self.deterministic:
            pytest.skip("backend does not promise deterministic greedy decoding")
        await anyio.to_thread.run_sync(self._pack_unpack_roundtrip, backend, model_config)

    def _pack_unpack_roundtrip(self, backend: Backend, config: ModelConfig) -> None:
        loaded = backend.load(config)
        model = loaded.handle
        try:
            prompt = backend.tokenize(model, self.prompt)
            backend.seq_rm(model, 0, 0, None)
            backend.step(model, [Prefill(seq=0, tokens=prompt, logits=True)])
            head = [self._decode(backend, model) for _ in range(3)]
            state = backend.kv_pack(model, 0)
            unbroken = [self._decode(backend, model) for _ in range(5)]
            # Restore into a cleared sequence: drop the last cell and re-decode it, since
            # states carry no logits.
            backend.seq_rm(model, 0, 0, None)
            backend.kv_unpack(model, 0, state)
            context = [*prompt, *head]
            backend.seq_rm(model, 0, len(context) - 1, None)
            backend.step(model, [Prefill(seq=0, tokens=context[-1:], logits=True)])
            restored = [self._decode(backend, model) for _ in range(5)]
            assert restored == unbroken
        finally:
            backend.free(model)

    @staticmethod
    def _decode(backend: Backend, model: Any) -> int:
        (res,) = backend.step(model, [Decode(seq=0, sampler=None)])
        assert isinstance(res, Sampled) and res.seq == 0
        return res.token

    @pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
    async def test_a_saved_state_restores_warm_from_each_cache_tier(
        self, backend_plugin: Any, model_config: ModelConfig, tmp_path: Path, tier: str
    ) -> None:
        """Save a row into one tier, then serve the same prompt from it.

        File tiers hand ``kv_unpack`` a ``memoryview`` into a reused buffer, not ``bytes``; a
        backend that assumes ``bytes`` there has every restore refused (counted in
        ``corrupt_files``), and every request then runs cold. File tiers are checked by a
        restarted engine, which can only find the row in the file."""
        registry = make_backend_registry({NAME: backend_plugin}, autoload=False)
        config = EngineConfig(cache=_tier_only(tier, tmp_path))
        # No live KV: the second request must come from the cache, not from the sequence.
        # A grid of 2 tokens, so that a short prompt has whole cells to save and restore
        # (a backend that is not batch-invariant reuses whole grid cells only).
        model = attrs.evolve(model_config, backend=NAME, keep_live_kv=False, prefill_chunk=2)
        async with open_engine(config, backends=registry) as engine:
            mid = await engine.load_model("m", model)
            cold = await engine.complete(mid, self.prompt, max_tokens=4)
            assert cold.cache_hit_kind == "cold"
            if tier == "ram":
                warm = await engine.complete(mid, self.prompt, max_tokens=4)
                hit, counters = engine.model_info(mid).last_cache_hit, engine.cache_counters()
        if tier != "ram":
            # Leaving the engine drained the writers: the row is a published file.
            async with open_engine(config, backends=registry) as engine:
                mid = await engine.load_model("m", model)
                warm = await engine.complete(mid, self.prompt, max_tokens=4)
                hit, counters = engine.model_info(mid).last_cache_hit, engine.cache_counters()
        assert counters.corrupt_files == 0, (
            f"the backend refused the state the {tier} tier handed kv_unpack: it must accept "
            "bytes, bytearray and memoryview"
        )
        assert warm.cache_hit_kind in ("exact", "partial"), f"not restored from {tier}"
        assert counters.hits >= 1
        assert hit is not None and hit.tier == tier
        if self.deterministic:
            assert warm.token_ids == cold.token_ids

    async def test_bad_prompts_get_invalid_request(
        self, conformance_engine: tuple[Engine, str]
    ) -> None:
        engine, mid = conformance_engine
        info = engine.model_info(mid)
        with pytest.raises(InvalidRequest) as exc:
            await engine.infer(mid, [info.n_vocab])
        assert exc.value.param == "prompt"
        with pytest.raises(InvalidRequest):
            await engine.infer(mid, [1] * info.n_ctx)
        with pytest.raises(InvalidRequest):
            await engine.infer(mid, [])
        # ... and the model still serves.
        assert (await engine.complete(mid, self.prompt, max_tokens=1)).token_ids

    # ---- optional capabilities ------------------------------------------------------------

    async def test_capabilities_are_known_names(self, backend: Backend) -> None:
        from ..backends.hookspecs import OPTIONAL_CAPABILITIES

        assert set(backend.capabilities) <= set(OPTIONAL_CAPABILITIES)

    async def test_missing_capabilities_raise_not_supported(
        self, conformance_engine: tuple[Engine, str], backend: Backend
    ) -> None:
        engine, mid = conformance_engine
        caps = engine.model_info(mid).capabilities
        assert caps == backend.capabilities
        calls: dict[str, Any] = {
            "chat_template": lambda: engine.apply_chat_template(
                mid, [{"role": "user", "content": "hi"}]
            ),
            "embed": lambda: engine.embed(mid, "hi"),
            "sampler": lambda: engine.infer(mid, self.prompt, temperature=0.7, seed=1),
            "adapters": lambda: engine.load_adapter(mid, "/nonexistent/adapter.gguf"),
        }
        for capability, call in calls.items():
            if capability in caps:
                continue
            with pytest.raises(NotSupported) as exc:
                await call()
            assert exc.value.backend == NAME
            assert exc.value.capability == capability
        if "sampler" not in caps:
            with pytest.raises(NotSupported):
                await engine.infer(mid, self.prompt, grammar='root ::= "a"')
        if "adapters" not in caps:
            for call in (
                lambda: engine.unload_adapter(mid, 1),
                lambda: engine.set_adapter_scale(mid, 1, 0.5),
            ):
                with pytest.raises(NotSupported):
                    await call()

    async def test_declared_capabilities_work(self, conformance_engine: tuple[Engine, str]) -> None:
        engine, mid = conformance_engine
        caps = engine.model_info(mid).capabilities
        if "chat_template" in caps:
            ids = await engine.apply_chat_template(mid, [{"role": "user", "content": "hi"}])
            assert ids and all(isinstance(t, int) for t in ids)
        if "embed" in caps:
            a = await engine.embed(mid, "one text")
            assert a == await engine.embed(mid, "one text")
            assert a != await engine.embed(mid, "quite another text")
            assert all(math.isfinite(x) for x in a)
        if "sampler" in caps:
            kw: dict[str, Any] = {"max_tokens": 6, "temperature": 0.9, "seed": 7}
            x = await engine.complete(mid, self.prompt, **kw)
            assert x.token_ids == (await engine.complete(mid, self.prompt, **kw)).token_ids
            with pytest.raises(InvalidRequest) as exc:
                await engine.infer(mid, self.prompt, grammar="root ::= (")
            assert exc.value.param == "grammar"
