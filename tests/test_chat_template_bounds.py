"""Rendering a chat template is bounded and says nothing of Python's internals.

The real-model side (special-token floods, tokenizing in pieces, stopping a cancelled
render) is in tests/real/test_chat_bounds_real.py.
"""

from __future__ import annotations

import pytest

from erllama.backends.llama_chat import render_chat_template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render(template: str, messages: list[dict[str, str]], **kw: object) -> str:
    return render_chat_template(
        template,
        messages,
        system=None,
        tools=None,
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
        **kw,  # type: ignore[arg-type]
    )


def test_a_render_past_its_size_bound_is_refused() -> None:
    messages = [{"role": "user", "content": "x" * 1000}] * 100
    assert len(render(CHATML, messages)) > 100_000
    with pytest.raises(ValueError, match="more than 50000 characters"):
        render(CHATML, messages, max_chars=50_000)


def test_a_template_that_fails_in_python_says_so_without_python_text() -> None:
    broken = "{{ messages[0]['content'] + 1 }}"  # str + int: a TypeError inside Jinja
    with pytest.raises(ValueError, match="failed to render") as err:
        render(broken, [{"role": "user", "content": "hi"}])
    text = str(err.value)
    assert "failed to render" in text
    assert "TypeError" not in text and "concatenate" not in text
    assert isinstance(err.value.__cause__, TypeError)  # kept for the log


def test_a_template_that_raises_on_purpose_keeps_its_words() -> None:
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        render(strict, [{"role": "user", "content": "hi"}])
