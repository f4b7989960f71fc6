"""The conformance suite catches a backend whose kv_unpack takes only ``bytes``.

Such a backend passes every other conformance test (they hand it what kv_pack returned),
then in real use has every restore from a file tier refused and serves every request cold.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama.backends import hookimpl, stub
from erllama.backends.hookspecs import REQUIRED_HOOKS
from erllama.testing import BackendConformance

pytestmark = pytest.mark.anyio


@hookimpl
def _bytes_only_kv_unpack(model: Any, seq: int, data: Any) -> None:
    # The bug: bytes.startswith does not exist on memoryview.
    if not data.startswith(b"ERSTUBKV"):
        raise ValueError("not a stub state")
    stub.kv_unpack(model, seq, bytes(data))


#: The stub's required hooks, except kv_unpack.
BYTES_ONLY = types.SimpleNamespace(
    **{name: getattr(stub, name) for name in REQUIRED_HOOKS if name != "kv_unpack"},
    kv_unpack=_bytes_only_kv_unpack,
)


class _Suite(BackendConformance):
    """The suite's tests, called directly with the broken backend (not collected)."""


@pytest.fixture
def config() -> erllama.ModelConfig:
    return erllama.ModelConfig(backend="stub", n_ctx=256)


async def test_the_bytes_only_backend_passes_the_checks_that_hand_it_bytes(
    config: erllama.ModelConfig, tmp_path: Path
) -> None:
    suite = _Suite()
    backend = erllama.make_backend_registry({"b": BYTES_ONLY}, autoload=False).get("b")
    await suite.test_restored_state_continues_like_the_unbroken_run(backend, config)
    # The in-process tier hands kv_unpack the bytes kv_pack made.
    await suite.test_a_saved_state_restores_warm_from_each_cache_tier(
        BYTES_ONLY, config, tmp_path, "ram"
    )


@pytest.mark.parametrize("tier", ["ram_file", "disk"])
async def test_the_file_tier_checks_fail_the_bytes_only_backend(
    config: erllama.ModelConfig, tmp_path: Path, tier: str
) -> None:
    with pytest.raises(AssertionError, match="must accept bytes, bytearray and memoryview"):
        await _Suite().test_a_saved_state_restores_warm_from_each_cache_tier(
            BYTES_ONLY, config, tmp_path, tier
        )


@pytest.mark.parametrize("tier", ["ram_file", "disk"])
async def test_the_same_checks_pass_the_real_stub(
    config: erllama.ModelConfig, tmp_path: Path, tier: str
) -> None:
    await _Suite().test_a_saved_state_restores_warm_from_each_cache_tier(
        stub, config, tmp_path, tier
    )
