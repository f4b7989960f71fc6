"""The KV cache on SmolLM2: warm restores continue exactly like cold runs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

import erllama

pytestmark = pytest.mark.anyio

SYSTEM = (
    "You are the assistant of a harbour office. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros, children travel free, bicycles cost three euros. The office "
    "opens at half past six and closes after the last ferry. Lost property is kept for a "
    "month. Dogs are welcome on the outer deck. The crossing takes forty minutes. "
) * 2


@pytest.fixture
def smol_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    """These tests pin the cache itself: live-KV reuse off, so every warm start is a row."""
    import attrs

    return attrs.evolve(smol_config, keep_live_kv=False)


def cfg(tmp_path: Path, **cache: Any) -> erllama.EngineConfig:
    fields: dict[str, Any] = {"ram_file_dir": tmp_path / "shm", "disk_dir": tmp_path / "disk"}
    fields.update(cache)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))


async def cold_miss(
    smol_config: erllama.ModelConfig, tmp_path: Path, prompt: list[int], n: int
) -> tuple[int, ...]:
    """The same request on a fresh engine whose (empty) cache misses: same chunking, no
    restore."""
    async with erllama.open_engine(cfg(Path(tempfile.mkdtemp(dir=tmp_path)))) as engine:
        mid = await engine.load_model("cold", smol_config)
        r = await engine.complete(mid, prompt, max_tokens=n)
        assert r.cache_hit_kind == "cold"
        return r.token_ids


def unbroken(
    smol_config: erllama.ModelConfig, p1: list[int], n1: int, follow: list[int], n2: int
) -> tuple[list[int], list[int]]:
    """One live sequence, never saved or restored: prefill ``p1`` in the engine's chunks,
    decode ``n1`` tokens, prefill ``follow``, decode ``n2``."""
    from erllama.backends import Decode, Prefill
    from erllama.cache.policy import cold_save_point
    from erllama.plugins import make_backend_registry

    backend = make_backend_registry().get("llama_cpp")
    model = backend.load(smol_config).handle
    try:
        point = cold_save_point(len(p1), erllama.CachePolicy()) or len(p1)
        backend.step(model, [Prefill(seq=0, tokens=p1[:point], logits=False)])
        backend.step(model, [Prefill(seq=0, tokens=p1[point:], logits=True)])
        first = [backend.step(model, [Decode(seq=0)])[0].token for _ in range(n1)]  # type: ignore[union-attr]
        backend.step(model, [Prefill(seq=0, tokens=follow, logits=True)])
        second = [backend.step(model, [Decode(seq=0)])[0].token for _ in range(n2)]  # type: ignore[union-attr]
        return first, second
    finally:
        backend.free(model)


async def test_exact_parent_and_prefix_restores_match_the_cold_run(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    async with erllama.open_engine(cfg(tmp_path)) as engine:
        mid = await engine.load_model("smol", smol_config)
        chat = [{"role": "user", "content": "When does the first ferry leave?"}]
        p1 = await engine.apply_chat_template(mid, chat, system=SYSTEM)
        assert len(p1) > 150
        r1 = await engine.complete(mid, p1, max_tokens=8)
        assert r1.cache_hit_kind == "cold" and r1.finish_reason == "length"

        # Exact: the conversation resent as it stands continues like the unbroken run.
        resent = [*p1, *r1.token_ids]
        exact = await engine.complete(mid, resent, max_tokens=16)
        assert exact.cache_hit_kind == "exact" and exact.cache_delta.read == len(resent)
        whole = await cold_miss(smol_config, tmp_path, p1, 8 + 16)
        assert whole[:8] == r1.token_ids
        assert exact.token_ids == whole[8:]

        # parent_key: the next turn extends the previous one's live state.
        follow = await engine.tokenize(
            mid,
            "<|im_end|>\n<|im_start|>user\nAnd how much is a ticket?<|im_end|>\n<|im_start|>assistant\n",
            add_special=False,
            parse_special=True,
        )
        p2 = [*p1, *r1.token_ids, *follow]
        r2 = await engine.complete(mid, p2, max_tokens=12, parent_key=r1.finish_key)
        assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == len(p1) + 8
        first, second = await anyio.to_thread.run_sync(unbroken, smol_config, p1, 8, follow, 12)
        assert tuple(first) == r1.token_ids
        assert r2.token_ids == tuple(second[: len(r2.token_ids)])

        # Longest prefix: another question under the same system prompt.
        p3 = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "Can I bring my dog?"}], system=SYSTEM
        )
        r3 = await engine.complete(mid, p3, max_tokens=16)
        assert r3.cache_hit_kind == "partial" and r3.cache_delta.read >= 128
        assert r3.token_ids == await cold_miss(smol_config, tmp_path, p3, 16)
        c = engine.cache_counters()
        assert (c.hits_exact, c.hits_resume, c.hits_longest_prefix) == (1, 1, 1)


async def test_a_longer_row_is_restored_up_to_where_the_prompts_differ(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    # No cold saves: the only row is the first request's finish row, which runs past where
    # the second prompt differs from it (the question).
    no_cold = erllama.CachePolicy(cold_min_tokens=30_000)
    async with erllama.open_engine(cfg(tmp_path, policy=no_cold)) as engine:
        mid = await engine.load_model("smol", smol_config)
        p1 = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "When does the first ferry leave?"}], system=SYSTEM
        )
        await engine.complete(mid, p1, max_tokens=8)
        p2 = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "Can I bring my dog?"}], system=SYSTEM
        )
        shared = next(i for i, (a, b) in enumerate(zip(p1, p2, strict=False)) if a != b)
        assert shared > 128
        found = await engine.longest_cached_prefix(mid, p2)
        assert (found.tokens, found.tier) == (shared, "ram")
        r2 = await engine.complete(mid, p2, max_tokens=16)
        assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == shared
        assert r2.token_ids == await cold_miss(smol_config, tmp_path, p2, 16)


async def test_a_resent_chat_is_warm_from_its_second_turn_with_default_policy(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    async with erllama.open_engine(cfg(tmp_path)) as engine:
        mid = await engine.load_model("smol", smol_config)
        history: list[dict[str, str]] = []
        kinds = []
        for question in ("Hello! Who are you?", "What can you do?", "Tell me a joke."):
            history.append({"role": "user", "content": question})
            prompt = await engine.apply_chat_template(mid, history)
            r = await engine.complete(mid, prompt, max_tokens=24)
            kinds.append((r.cache_hit_kind, r.cache_delta.read, len(prompt)))
            history.append({"role": "assistant", "content": r.text})
        assert kinds[0][0] == "cold"
        for kind, read, n in kinds[1:]:
            assert kind == "partial" and read > n // 2


async def test_a_restarted_engine_is_warm_from_disk(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    config = cfg(tmp_path, ram_file_dir=None)
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("smol", smol_config)
        p = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "Hi"}], system=SYSTEM
        )
        first = await engine.complete(mid, p, max_tokens=8)
    async with erllama.open_engine(config) as engine:
        assert engine.cache_counters().rows_disk >= 2
        mid = await engine.load_model("smol", smol_config)
        again = await engine.complete(mid, [*p, *first.token_ids], max_tokens=8)
        assert again.cache_hit_kind == "exact"
        assert engine.model_info(mid).last_cache_hit.tier == "disk"  # type: ignore[union-attr]


async def test_live_kv_reuse_continues_like_the_unbroken_run(
    smol_config: erllama.ModelConfig,
) -> None:
    import attrs

    live = attrs.evolve(smol_config, keep_live_kv=True)
    off = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(off) as engine:
        mid = await engine.load_model("smol", live)
        p1 = await engine.apply_chat_template(
            mid, [{"role": "user", "content": "When does the first ferry leave?"}], system=SYSTEM
        )
        r1 = await engine.complete(mid, p1, max_tokens=8)
        follow = await engine.tokenize(
            mid,
            "<|im_end|>\n<|im_start|>user\nAnd the last one?<|im_end|>\n<|im_start|>assistant\n",
            add_special=False,
            parse_special=True,
        )
        r2 = await engine.complete(mid, [*p1, *r1.token_ids, *follow], max_tokens=12)
        assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == len(p1) + 8
        assert engine.model_info(mid).last_cache_hit.source == "live"  # type: ignore[union-attr]
    # The engine's cache is off, so p1 was prefilled in one piece: match that.
    first, second = await anyio.to_thread.run_sync(unbroken_whole, live, p1, 8, follow, 12)
    assert tuple(first) == r1.token_ids
    assert r2.token_ids == tuple(second[: len(r2.token_ids)])


def unbroken_whole(
    config: erllama.ModelConfig, p1: list[int], n1: int, follow: list[int], n2: int
) -> tuple[list[int], list[int]]:
    from erllama.backends import Decode, Prefill
    from erllama.plugins import make_backend_registry

    backend = make_backend_registry().get("llama_cpp")
    model = backend.load(config).handle
    try:
        backend.step(model, [Prefill(seq=0, tokens=p1, logits=True)])
        first = [backend.step(model, [Decode(seq=0)])[0].token for _ in range(n1)]  # type: ignore[union-attr]
        backend.step(model, [Prefill(seq=0, tokens=follow, logits=True)])
        second = [backend.step(model, [Decode(seq=0)])[0].token for _ in range(n2)]  # type: ignore[union-attr]
        return first, second
    finally:
        backend.free(model)


async def test_two_kv_layouts_sharing_a_cache_directory_keep_their_own_rows(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    """One GGUF served with one sequence and with four, alternately, on one cache directory:
    llama.cpp cannot restore a state across sequence counts, so each layout keys its own
    rows; neither refuses (and deletes) the other's."""
    import attrs

    prompt = list(range(1000, 1100))
    config = cfg(tmp_path, ram_bytes=0, policy=erllama.CachePolicy(min_tokens=4))
    seen: list[tuple[int, str]] = []
    for n_seq in (1, 4, 1, 4):
        layout = attrs.evolve(smol_config, n_seq_max=n_seq)
        async with erllama.open_engine(config) as engine:
            mid = await engine.load_model("m", layout)
            r = await engine.complete(mid, prompt, max_tokens=4)
            await engine.wait_saved()
            seen.append((n_seq, r.cache_hit_kind))
            assert engine.cache_counters().corrupt_files == 0
    assert seen == [(1, "cold"), (4, "cold"), (1, "exact"), (4, "exact")]
