"""What leaves a user's `async with open_engine()` block leaves as itself, on both loops."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import erllama

from .helpers import stub_config

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).with_name("scripts") / "interrupt_mid_stream.py"


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), KeyError("mine")])
async def test_an_exception_from_the_block_leaves_unwrapped(
    registry: erllama.plugins.BackendRegistry,
    no_cache: erllama.EngineConfig,
    raised: BaseException,
) -> None:
    with pytest.raises(type(raised)) as exc:
        async with erllama.open_engine(no_cache, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config(step_delay_s=0.001))
            stream = await engine.infer(mid, "busy", max_tokens=10_000)
            await stream.receive()  # a request is running when the block raises
            raise raised
    assert exc.value is raised
    assert not isinstance(exc.value, BaseExceptionGroup)


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_ctrl_c_mid_stream_ends_the_program_like_any_ctrl_c(loop: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "streaming"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # Python's own Ctrl-C exit: killed by SIGINT (status 130 in a shell), one short
    # KeyboardInterrupt traceback, no exception group.
    assert proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    assert "ExceptionGroup" not in err and "MultiError" not in err, err
