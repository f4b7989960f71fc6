"""The public API is typed: a type checker catches misspelt request arguments."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import mypy.api
import pytest

import erllama
from erllama.model.intake import RequestArgs
from erllama.options import RequestOptions, SamplingOptions


def test_the_typed_options_are_exactly_the_validated_request_arguments() -> None:
    typed = set(RequestOptions.__annotations__) | set(SamplingOptions.__annotations__)
    assert typed == RequestArgs.keywords()
    assert typed - set(SamplingOptions.__annotations__) == {"add_special"}
    for method in (erllama.Engine.infer, erllama.Engine.complete):
        params = inspect.signature(method).parameters
        assert [p.kind for p in params.values()][-1] is inspect.Parameter.VAR_KEYWORD
    with pytest.raises(TypeError, match="max_token"):
        RequestArgs.build(max_token=3)


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
                await engine.infer("m", "hi", max_token=3)
            """
        )
    )
    out, _err, status = mypy.api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    assert status == 1
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 5, out
    for name in ('"max_token"', '"temprature"', '"stopp"', '"max_tokens"'):
        assert any(name in line for line in errors), (name, out)
