"""The KV cache on SmolLM2: a cache hit never changes an answer.

The reference for every warm answer is the cache-off run of the same prompt: an engine of
its own with the cache off and no live-KV reuse, so every prompt there is prefilled cold
from position 0. Each warm path (a partial hit on a shared system prompt, an exact resend, a
row longer than the prompt and trimmed, ``parent_key`` resuming a turn, a sequence's live
KV, a restart restoring from disk, rows written while other sequences decoded beside them)
must give the same tokens, token for token (docs/caching.md#exactness).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import erllama

from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio

SYSTEM = (
    "You are the assistant of a harbour office. Ferries leave at seven, ten, one and four. "
    "Tickets cost twelve euros, children travel free, bicycles cost three euros. The office "
    "opens at half past six and closes after the last ferry. Lost property is kept for a "
    "month. Dogs are welcome on the outer deck. The crossing takes forty minutes. "
) * 2

QUESTIONS = [
    "When does the first ferry leave?",
    "How much is a ticket for a child?",
    "Can I bring my dog?",
    "What is the capital of Australia?",
    "How long is the crossing?",
    "Where do I find lost property?",
    "Is there a ferry at noon?",
    "Do bicycles cost extra?",
    "When does the office close?",
    "Name three rivers.",
    "Write one sentence about the sea.",
    "What should I bring for the trip?",
]
SHORT = [
    "Hi",
    "Capital of France?",
    "2+2=",
    "Say yes.",
    "Name a colour.",
    "Good morning!",
    "Count to five.",
    "What is a ferry?",
    "Thanks!",
    "Spell cat.",
    "One word: sky?",
    "Tell me a fact.",
]
N = 12
#: The prefill grid these tests run with (ModelConfig.prefill_chunk).
GRID = 64


@pytest.fixture
def smol_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    """No live-KV reuse unless a test asks for it: every warm start is a row. On the grid
    (the counts below are whole grid cells); padded chunks: test_padded_prefill_real.py."""
    return attrs.evolve(smol_config, keep_live_kv=False, prefill_chunk=GRID, options=GRID_FEEDING)


def cfg(tmp_path: Path, **cache: Any) -> erllama.EngineConfig:
    fields: dict[str, Any] = {"ram_file_dir": tmp_path / "shm", "disk_dir": tmp_path / "disk"}
    fields.update(cache)
    return erllama.EngineConfig(cache=erllama.CacheConfig(**fields))


OFF = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))


class Cold:
    """Answers of the cache-off run (computed once per prompt)."""

    def __init__(self, engine: erllama.Engine, mid: str) -> None:
        self.engine, self.mid = engine, mid
        self._known: dict[tuple[int, ...], tuple[int, ...]] = {}

    async def __call__(self, prompt: Sequence[int], n: int = N) -> tuple[int, ...]:
        key = (*prompt, -n)
        if key not in self._known:
            r = await self.engine.complete(self.mid, list(prompt), max_tokens=n)
            assert r.cache_hit_kind == "cold"
            self._known[key] = r.token_ids
        return self._known[key]


def expected_kind(n_prompt: int, known: int) -> str:
    return "exact" if known == n_prompt else "partial"


async def hit_matrix(
    config: erllama.ModelConfig,
    tmp_path: Path,
    messages: list[list[dict[str, str]]],
    system: str | None,
    policy: erllama.CachePolicy | None = None,
) -> dict[str, int]:
    """Every warm path for ``messages`` (one chat each), each answer checked against the
    cache-off run under the same config; returns how many answers each path gave."""
    grid = config.effective_prefill_chunk
    kinds: dict[str, int] = {}

    def saw(kind: str) -> None:
        kinds[kind] = kinds.get(kind, 0) + 1

    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", config))
        # RAM and disk: leaving the engine spills its RAM rows to disk, for the restart.
        cached = cfg(tmp_path, ram_file_dir=None, policy=policy or erllama.CachePolicy())
        async with erllama.open_engine(cached) as engine:
            mid = await engine.load_model("smol", config)
            prompts = [await engine.apply_chat_template(mid, m, system) for m in messages]
            # First pass: the prompts share their beginning (a system prompt, the
            # template's head): the later ones restore it.
            first = []
            for i, p in enumerate(prompts):
                r = await engine.complete(mid, p, max_tokens=N)
                assert r.token_ids == await cold(p), f"first pass, prompt {i}"
                assert r.cache_delta.read % grid == 0
                saw("partial" if r.cache_hit_kind == "partial" else "first-cold")
                first.append(r)
            # Resent as they stand: everything but the last partial cell restored.
            for i, p in enumerate(prompts):
                r = await engine.complete(mid, p, max_tokens=N)
                assert r.cache_delta.read == (len(p) - 1) // grid * grid, i
                assert r.cache_hit_kind == expected_kind(len(p), len(p) // grid * grid)
                assert r.token_ids == await cold(p), f"resent, prompt {i}"
                saw("resent")
            # Trimmed: a prompt that ends inside a longer row (restored, then cut back to
            # the part's whole cells; a shorter prefix row may serve as well).
            for p in prompts[:3]:
                part = p[: len(p) // grid * grid - 1]
                r = await engine.complete(mid, part, max_tokens=N)
                assert r.cache_delta.read == (len(part) - 1) // grid * grid
                assert r.token_ids == await cold(part)
                saw("trimmed")
            # Resume: the next turn from the previous one's finish key.
            follow = await engine.tokenize(
                mid,
                "<|im_end|>\n<|im_start|>user\nAnd after that?<|im_end|>\n<|im_start|>assistant\n",
                add_special=False,
                parse_special=True,
            )
            for p, r1 in list(zip(prompts, first, strict=True))[:4]:
                p2 = [*p, *r1.token_ids, *follow]
                r2 = await engine.complete(mid, p2, max_tokens=N, parent_key=r1.finish_key)
                # The row holds the first prompt's whole grid cells, never generated tokens.
                assert r2.cache_hit_kind == "partial"
                assert r2.cache_delta.read == len(p) // grid * grid
                assert r2.token_ids == await cold(p2)
                saw("resume")
        # A restart: rows come back from disk.
        async with erllama.open_engine(cached) as engine:
            mid = await engine.load_model("smol", config)
            for p in prompts[:3]:
                r = await engine.complete(mid, p, max_tokens=N)
                assert engine.model_info(mid).last_cache_hit.tier == "disk"  # type: ignore[union-attr]
                assert r.token_ids == await cold(p)
                saw("disk")
        # Live KV, the cache off: each prompt on the sequence the previous one left.
        live = attrs.evolve(config, keep_live_kv=True)
        off_live = erllama.EngineConfig(
            cache=erllama.CacheConfig(
                enabled=False, ram_file_dir=None, policy=policy or erllama.CachePolicy()
            )
        )
        async with erllama.open_engine(off_live) as engine:
            mid = await engine.load_model("smol", live)
            for i, p in enumerate(prompts[:6]):
                r = await engine.complete(mid, p, max_tokens=N)
                assert r.token_ids == await cold(p), f"live reuse, prompt {i}"
                hit = engine.model_info(mid).last_cache_hit
                if hit is not None and hit.source == "live":
                    saw("live")
    return kinds


async def test_chats_sharing_a_system_prompt_answer_as_the_cache_off_run_on_every_path(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    kinds = await hit_matrix(smol_config, tmp_path, messages, SYSTEM)
    assert kinds == {
        "first-cold": 1,
        "partial": 11,
        "resent": 12,
        "trimmed": 3,
        "resume": 4,
        "disk": 3,
        "live": 5,
    }


async def test_short_prompts_answer_as_the_cache_off_run_on_every_path(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    """Short prompts, on a grid of 8 tokens (so they have whole cells to reuse)."""
    small = attrs.evolve(smol_config, prefill_chunk=8)
    messages = [[{"role": "user", "content": q}] for q in SHORT]
    # Rows as short as one cell of 8.
    policy = erllama.CachePolicy(min_tokens=8, cold_min_tokens=8)
    kinds = await hit_matrix(small, tmp_path, messages, None, policy)
    assert kinds["resent"] == 12 and kinds["trimmed"] == 3 and kinds["resume"] == 4
    assert kinds["disk"] == 3 and kinds["live"] == 5
    assert kinds["partial"] + kinds.get("first-cold", 0) == 12 and kinds["partial"] >= 10


async def test_a_row_restored_into_a_prompt_several_grid_cells_longer(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    """A row saved by one request restores into prompts that extend it by several cells,
    whether a prompt's length is a multiple of the grid or not."""
    base = list(range(1000, 1000 + 2 * GRID))  # two whole cells
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", smol_config))
        async with erllama.open_engine(cfg(tmp_path)) as engine:
            mid = await engine.load_model("smol", smol_config)
            key = await engine.prefill_only(mid, base)
            assert key is not None
            for extra in (3 * GRID, 3 * GRID + 5, 4 * GRID - 1, 1):
                prompt = [*base, *range(5000, 5000 + extra)]
                r = await engine.complete(mid, prompt, max_tokens=N, parent_key=key)
                assert r.cache_hit_kind == "partial" and r.cache_delta.read == 2 * GRID
                assert r.token_ids == await cold(prompt), extra
            # A prompt of whole cells, resent: an exact hit re-feeds its last cell.
            whole = [*base, *range(5000, 5000 + GRID)]
            await engine.complete(mid, whole, max_tokens=N)
            r = await engine.complete(mid, whole, max_tokens=N)
            assert r.cache_hit_kind == "exact" and r.cache_delta.read == 2 * GRID
            assert r.token_ids == await cold(whole)


async def test_rows_prefilled_beside_other_sequences_restore_exactly(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    """Prompts prefilled while other sequences decode (each chunk in a call of its own)
    leave rows whose restores answer as the cache-off run."""
    multi = attrs.evolve(smol_config, n_seq_max=3, n_batch=256)
    async with erllama.open_engine(OFF) as off:
        cold = Cold(off, await off.load_model("cold", multi))
        async with erllama.open_engine(cfg(tmp_path)) as engine:
            mid = await engine.load_model("smol", multi)
            prompts = [
                await engine.apply_chat_template(mid, [{"role": "user", "content": q}], SYSTEM)
                for q in QUESTIONS[:3]
            ]
            # Staggered: the later prompts prefill while the first decodes.
            async with anyio.create_task_group() as tg:
                for p in prompts:
                    tg.start_soon(functools.partial(engine.complete, mid, p, max_tokens=40))
                    await anyio.lowlevel.checkpoint()
            for p in prompts:
                r = await engine.complete(mid, p, max_tokens=N)
                assert r.cache_delta.read == (len(p) - 1) // GRID * GRID
                assert r.token_ids == await cold(p)


async def test_several_sequences_decode_as_one_alone_with_flash_attention_off(
    smol_config: erllama.ModelConfig,
) -> None:
    """What erllama guarantees with ``n_seq_max > 1``: a prompt's cells never depend on
    what else runs (above); a generated token can, on llama.cpp's CPU flash-attention
    kernel, once a context passes 256 cells with several threads. With ``flash_attn=False``
    decoding is batch-invariant: concurrent answers equal each one run alone."""
    config = attrs.evolve(
        smol_config, n_seq_max=3, n_batch=256, flash_attn=False, n_ctx=1024, n_threads=2
    )
    prompts = [list(range(2000 + 100 * i, 2000 + 100 * i + 90)) for i in range(3)]
    async with erllama.open_engine(OFF) as engine:
        mid = await engine.load_model("smol", config)
        alone = [(await engine.complete(mid, p, max_tokens=16)).token_ids for p in prompts]
        together: list[tuple[int, ...]] = [(), (), ()]

        async def run(i: int) -> None:
            together[i] = (await engine.complete(mid, prompts[i], max_tokens=16)).token_ids

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(run, i)
    assert together == alone


async def test_two_kv_layouts_sharing_a_cache_directory_keep_their_own_rows(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    """One GGUF served with one sequence and with four, alternately, on one cache directory:
    llama.cpp cannot restore a state across sequence counts, so each layout keys its own
    rows; neither refuses (and deletes) the other's."""
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
    # 100 tokens: one whole cell of 64 is saved, so a resend is a partial hit on it.
    assert seen == [(1, "cold"), (4, "cold"), (1, "partial"), (4, "partial")]
