"""Every request ends with exactly one terminal event, whatever fails around it."""

from __future__ import annotations

import anyio
import pytest

import erllama
from erllama import Done, Token

from .helpers import stub_config

pytestmark = pytest.mark.anyio


async def test_a_failure_while_setting_up_the_sequence_ends_the_stream(
    registry: erllama.plugins.BackendRegistry, no_cache: erllama.EngineConfig
) -> None:
    # seq_rm runs while the sequence is set up (a cold prompt clears it first).
    with anyio.fail_after(10):
        async with erllama.open_engine(no_cache, backends=registry) as engine:
            mid = await engine.load_model("m", stub_config(fail_at="seq_rm"))
            stream = await engine.infer(mid, "hello there", max_tokens=3)
            with pytest.raises(erllama.BackendError) as exc:
                async for ev in stream:
                    assert isinstance(ev, Token | Done)
            assert "injected failure at seq_rm" in str(exc.value.__cause__)
            assert engine.status(mid) == "failed"
            # A late cancel of the ended request must not keep the engine from closing.
            engine.cancel(stream.ref)
            stream.cancel()
