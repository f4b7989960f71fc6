"""The built-in sources: real psutil, and nvidia-smi faked by small scripts on PATH."""

from __future__ import annotations

import logging
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import erllama
from erllama.pressure import DeviceMemory, PressureSample
from erllama.pressure.nvidia_smi import parse_output
from erllama.pressure.registry import PressureSourceRegistry

from ..helpers import stub_config
from .conftest import OpenEngine

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
#: Found before a test narrows PATH to the fake's directory.
SLEEP = shutil.which("sleep")

#: What ``nvidia-smi --query-gpu=index,memory.used,memory.total
#: --format=csv,noheader,nounits`` prints on a two-GPU machine: GPU 1 is nearly full.
TWO_GPUS = "0, 1843, 81559\n1, 79870, 81559\n"


FakeSmi = Callable[[str], Path]


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    """``fake_smi(body)`` writes an ``nvidia-smi`` shell script and puts only its
    directory on PATH. The script records its arguments in ``args.txt``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))

    def write(body: str) -> Path:
        script = bindir / "nvidia-smi"
        script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args.txt"\n{body}\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        return tmp_path / "args.txt"

    return write


async def sample_of(sources: PressureSourceRegistry, name: str, **config: object) -> PressureSample:
    cfg = erllama.PressureConfig(enabled=True, source=name, **config)  # type: ignore[arg-type]
    return await sources.get(name).sample(cfg)


async def test_psutil_reads_plausible_system_memory(sources: PressureSourceRegistry) -> None:
    s = await sample_of(sources, "psutil")
    assert s.available and s.source == "psutil"
    assert [d.name for d in s.devices] == ["system"]
    assert s.used_bytes is not None and s.total_bytes is not None
    assert 0 < s.used_bytes <= s.total_bytes
    assert s.total_bytes > 64 * MIB


async def test_nvidia_smi_reads_every_gpu_and_pressure_follows_the_fullest(
    sources: PressureSourceRegistry, fake_smi: FakeSmi
) -> None:
    args = fake_smi(f"printf '{TWO_GPUS}'")
    s = await sample_of(sources, "nvidia_smi")
    assert s.available, s.error
    assert s.devices == (
        DeviceMemory(name="gpu0", used_bytes=1843 * MIB, total_bytes=81559 * MIB),
        DeviceMemory(name="gpu1", used_bytes=79870 * MIB, total_bytes=81559 * MIB),
    )
    assert s.fullest is not None and s.fullest.name == "gpu1"
    assert s.ratio == pytest.approx(79870 / 81559)
    assert args.read_text().split() == [
        "--query-gpu=index,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    ]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("echo 'Tesla T4, 15360 MiB'", "unparsable nvidia-smi output"),
        ("echo '0, [N/A], 81559'", "cannot read memory.used"),
        ("echo '0, 90000, 81559'", "implausible memory reading"),
        ("echo 'gpu, 1, 2'", "cannot read the GPU index"),
        ("true", "nvidia-smi listed no GPUs"),
        (
            "echo 'NVIDIA-SMI has failed because it could not communicate with the "
            "NVIDIA driver.'; exit 9",
            "nvidia-smi exited with status 9: NVIDIA-SMI has failed",
        ),
        ("echo 'no devices' >&2; exit 6", "exited with status 6: no devices"),
    ],
)
async def test_nvidia_smi_garbage_or_failure_is_unavailable(
    sources: PressureSourceRegistry,
    fake_smi: FakeSmi,
    caplog: pytest.LogCaptureFixture,
    body: str,
    why: str,
) -> None:
    fake_smi(body)
    with caplog.at_level(logging.WARNING, logger="erllama.pressure"):
        s = await sample_of(sources, "nvidia_smi")
    assert not s.available and s.devices == () and s.ratio is None
    assert s.error is not None and why in s.error
    assert f"pressure source 'nvidia_smi' unavailable: {s.error}" in caplog.text


async def test_nvidia_smi_missing_is_unavailable(
    sources: PressureSourceRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    s = await sample_of(sources, "nvidia_smi")
    assert s.error == "nvidia-smi not found on PATH"


async def test_nvidia_smi_that_hangs_is_killed_and_unavailable(
    sources: PressureSourceRegistry, fake_smi: FakeSmi
) -> None:
    fake_smi(f"exec {SLEEP} 30")
    with anyio.fail_after(10):
        s = await sample_of(sources, "nvidia_smi", sample_timeout_s=0.2)
    assert s.error == "no reading within 0.2 s"


async def test_nvidia_smi_drives_unloading_by_the_fullest_gpu(
    open_engine: OpenEngine, sources: PressureSourceRegistry, fake_smi: FakeSmi
) -> None:
    fake_smi(f"printf '{TWO_GPUS}'")
    cfg = erllama.PressureConfig(enabled=True, source="nvidia_smi", evict_tiers=[])
    async with open_engine(cfg, enabled=False) as engine:
        await engine.load_model("m", stub_config())
        res = await engine.force_check()
        # Summed, the two GPUs are at 50 %: below the watermark. GPU 1 alone is at 98 %.
        assert res.outcome == "freed" and res.unloaded_models == ("m",)
        assert res.target_bytes == (79870 * MIB) - int(0.75 * 81559 * MIB)
        assert engine.pressure_status().last_sample == res.after


def test_parse_output_reads_mib_and_ignores_blank_lines() -> None:
    assert parse_output("\n3, 0, 1024\n\n") == (
        DeviceMemory(name="gpu3", used_bytes=0, total_bytes=1024 * MIB),
    )
