"""The public API is typed: a type checker catches misspelt request arguments."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import mypy.api
import pytest

import erllama
from erllama.options import RequestOptions, SamplingOptions


def test_complete_and_chat_take_exactly_the_arguments_of_infer() -> None:
    infer = inspect.signature(erllama.Engine.infer).parameters
    keyword = {n for n, p in infer.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(RequestOptions.__annotations__) | set(SamplingOptions.__annotations__) == keyword
    assert keyword - set(SamplingOptions.__annotations__) == {"add_special"}


@pytest.mark.slow
def test_mypy_catches_a_misspelt_keyword_at_complete_and_chat(tmp_path: Path) -> None:
    snippet = tmp_path / "use.py"
    snippet.write_text(
        textwrap.dedent(
            """
            import erllama

            async def main(engine: erllama.Engine) -> None:
                await engine.complete("m", "hi", max_tokens=3, temperature=0.5)
                await engine.complete("m", "hi", max_token=3)
                await engine.complete("m", "hi", temprature=0.5)
                await engine.chat("m", [{"role": "user", "content": "hi"}], stopp=["x"])
                await engine.complete("m", "hi", max_tokens="3")
            """
        )
    )
    out, _err, status = mypy.api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    assert status == 1
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 4, out
    for name in ('"max_token"', '"temprature"', '"stopp"', '"max_tokens"'):
        assert any(name in line for line in errors), (name, out)
