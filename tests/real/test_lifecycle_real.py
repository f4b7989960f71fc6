"""The model lifecycle on SmolLM2: cache rows outlive the weights.

Two models (the same GGUF under two ids) on a budget that fits one (``max_loaded_models
= 1``), asked in turn: every request runs on a model just loaded again, and from the second
turn on it restores the previous turn's row from a file tier (the RAM tier is off) instead
of prefilling cold, and answers exactly as a cold run of the same prompt does.

The models run on a prefill grid of 8 tokens (``prefill_chunk``), so that these short
prompts have whole cells to restore: a later prompt restores the previous prompt's whole
cells (its reply, decoded one token at a time, is prefilled again; docs/caching.md
"Exactness"), and answers token for token as the cold run does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import erllama

from ..helpers import common_prefix_len
from .grid import GRID_FEEDING

pytestmark = pytest.mark.anyio

SYSTEMS = {
    "harbour": "You answer questions about the harbour office. Ferries leave at seven, ten, "
    "one and four; tickets cost twelve euros, bicycles three. " * 3,
    "library": "You answer questions about the town library. It opens at nine and closes "
    "at six; books are lent for three weeks, films for one. " * 3,
}
GRID = 8
QUESTIONS = {
    "harbour": ("When does the first ferry leave?", "And the last one?", "How much is it?"),
    "library": ("When does it open?", "How long can I keep a book?", "And a film?"),
}


@pytest.fixture
def smol_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    import attrs

    return attrs.evolve(smol_config, prefill_chunk=GRID, options=GRID_FEEDING)


def config(tmp_path: Path, smol_config: erllama.ModelConfig) -> erllama.EngineConfig:
    return erllama.EngineConfig(
        # No RAM tier: every row lives in /dev/shm-like files or on disk.
        cache=erllama.CacheConfig(
            ram_bytes=0, ram_file_dir=tmp_path / "shm", disk_dir=tmp_path / "disk"
        ),
        models=dict.fromkeys(SYSTEMS, smol_config),
        preload=[],
        max_loaded_models=1,
    )


async def cold(
    smol_config: erllama.ModelConfig, tmp_path: Path, prompt: list[int]
) -> erllama.Completion:
    """The same request on a fresh engine whose (empty) cache misses."""
    fresh = Path(tempfile.mkdtemp(dir=tmp_path))
    cfg = erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=fresh / "shm", disk_dir=fresh / "disk")
    )
    async with erllama.open_engine(cfg) as engine:
        mid = await engine.load_model("cold", smol_config)
        done = await engine.complete(mid, prompt, max_tokens=12)
        assert done.cache_hit_kind == "cold"
        return done


async def test_alternating_models_on_a_budget_of_one_are_warm_after_every_reload(
    smol_config: erllama.ModelConfig, tmp_path: Path
) -> None:
    async with erllama.open_engine(config(tmp_path, smol_config)) as engine:
        history: dict[str, list[dict[str, str]]] = {m: [] for m in SYSTEMS}
        last: dict[str, erllama.Completion] = {}
        for turn in range(3):
            for m in SYSTEMS:
                other = next(o for o in SYSTEMS if o != m)
                history[m].append({"role": "user", "content": QUESTIONS[m][turn]})
                # Rendering the template is the model's first use: it loads, the other goes.
                prompt = await engine.apply_chat_template(m, history[m], system=SYSTEMS[m])
                assert [i.id for i in engine.list_models()] == [m]
                done = await engine.complete(m, prompt, max_tokens=12)
                assert done.finish_reason in ("stop", "length")
                if turn == 0:
                    assert done.cache_hit_kind == "cold"
                else:
                    before = last[m]
                    # The previous turn's finish row holds its prompt's whole grid cells;
                    # this prompt extends that prompt, so the row is restored, from a
                    # file tier.
                    common = common_prefix_len(prompt, before.context_tokens)
                    assert common >= before.stats.prompt_tokens
                    restored = before.stats.prompt_tokens // GRID * GRID
                    assert done.cache_hit_kind == "partial", (turn, m)
                    assert done.cache_delta.read == restored, (turn, m)
                    hit = engine.model_info(m).last_cache_hit
                    assert hit is not None and hit.tier in ("ram_file", "disk"), hit
                assert done.token_ids == (await cold(smol_config, tmp_path, prompt)).token_ids
                history[m].append({"role": "assistant", "content": done.text})
                last[m] = done
                states = {s.id: s for s in engine.model_states()}
                if turn or m != "harbour":
                    assert states[other].state == "unloaded"
        states = {s.id: s for s in engine.model_states()}
        assert states["harbour"].loads == 3 and states["library"].loads == 3
        assert states["harbour"].unloads == {"max_loaded_models": 3}
        assert states["library"].unloads == {"max_loaded_models": 2}
