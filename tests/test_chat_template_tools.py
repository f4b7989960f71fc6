"""Tools on a chat template that knows none: one system message, the template's own default
system prompt kept, each function's JSON schema and the call syntax in it.

The real-model side (SmolLM2's template, which has no tool support) is in
tests/server/test_dropin_real.py.
"""

from __future__ import annotations

import json
from typing import Any

from erllama.backends.llama_chat import render_chat_template

#: SmolLM2's shape: ChatML with a default system prompt when the messages bring none.
WITH_DEFAULT = (
    "{% for m in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are SmolLM.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: ChatML without a default system prompt.
PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: A template with tool support of its own.
KNOWS_TOOLS = "{% if tools %}TOOLS={{ tools | length }}\n{% endif %}" + PLAIN

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def render(template: str, messages: list[dict[str, str]], **kw: Any) -> str:
    kw.setdefault("system", None)
    kw.setdefault("tools", [WEATHER])
    return render_chat_template(
        template, messages, add_generation_prompt=True, bos_token="", eos_token="", **kw
    )


def system_blocks(text: str) -> list[str]:
    blocks = text.split("<|im_start|>system\n")[1:]
    return [b.split("<|im_end|>")[0] for b in blocks]


USER = [{"role": "user", "content": "Weather in Oslo?"}]


def test_the_templates_default_system_prompt_is_kept_before_the_tools() -> None:
    (system,) = system_blocks(render(WITH_DEFAULT, USER))
    assert system.startswith("You are SmolLM.\n\n")
    # Each function's whole JSON schema, and the call syntax between the markers.
    assert json.dumps(WEATHER["function"]) in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' in system


def test_a_client_system_message_is_the_one_system_message_with_the_tools() -> None:
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    for template in (WITH_DEFAULT, PLAIN):
        (system,) = system_blocks(render(template, messages))
        assert system.startswith("Be brief.\n\n") and "You are SmolLM." not in system
        assert '"name": "get_weather"' in system
    (system,) = system_blocks(render(WITH_DEFAULT, USER, system="Be brief."))
    assert system.startswith("Be brief.\n\n")


def test_a_template_without_a_default_gets_a_system_message_of_the_tools_alone() -> None:
    text = render(PLAIN, USER)
    (system,) = system_blocks(text)
    assert system.startswith("You may call one or more functions")
    assert text.endswith("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")


def test_the_call_syntax_names_the_models_own_markers() -> None:
    (system,) = system_blocks(
        render(PLAIN, USER, tool_call_markers=("<function_call>", "</function_call>"))
    )
    assert "within <function_call></function_call> tags" in system
    assert "<tool_call>" not in system


def test_a_template_with_tool_support_gets_the_tools_itself() -> None:
    text = render(KNOWS_TOOLS, USER)
    assert text.startswith("TOOLS=1\n") and system_blocks(text) == []
    # Without tools nothing changes, on any template.
    assert render(WITH_DEFAULT, USER, tools=None) == render(WITH_DEFAULT, USER, tools=[])
    assert system_blocks(render(WITH_DEFAULT, USER, tools=None)) == ["You are SmolLM."]
