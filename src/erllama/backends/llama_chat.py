"""Rendering a GGUF's own ``tokenizer.chat_template`` (Jinja) in a sandbox.

llama.cpp's ``llama_chat_apply_template`` only recognises a fixed list of templates by
heuristics and knows nothing of tools; the GGUF carries the real Jinja template, so we render
that, the way the model's authors wrote it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.from_thread

log = logging.getLogger("erllama.backends")

__all__ = ["cancel_point", "render_chat_template", "split_verbatim", "tools_instructions"]


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


#: Stands for a system message while a template's default one is worked out.
_PROBE_SYSTEM = "\x1eerllama-probe-system\x1e"


def tools_instructions(tools: Sequence[Mapping[str, Any]], markers: tuple[str, str]) -> str:
    """The tools for a template without tool support, as a system message says them:
    each function's JSON schema, and the call syntax between the model's markers (Hermes'
    wording, which many models were trained on)."""
    start, end = markers
    specs = [json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools]
    return "\n".join(
        [
            "You may call one or more functions to assist with the user query.",
            "",
            "You are provided with function signatures within <tools></tools> XML tags:",
            "<tools>",
            *specs,
            "</tools>",
            "",
            "For each function call, return a JSON object with the function name and "
            f"arguments within {start}{end} tags:",
            f'{start}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{end}',
        ]
    )


def _default_system(render: Callable[[list[dict[str, Any]]], str]) -> str:
    """The system prompt a template writes when the messages bring none (SmolLM2's "You
    are a helpful AI assistant named SmolLM ..."), or "" when it writes none: rendered
    with a probe system message and without one; where the probe stands, the other
    rendering has the default, if everything around it is the same."""
    user = {"role": "user", "content": "?"}
    with_probe = render([{"role": "system", "content": _PROBE_SYSTEM}, user])
    without = render([user])
    at = with_probe.find(_PROBE_SYSTEM)
    if at < 0:
        return ""
    before, after = with_probe[:at], with_probe[at + len(_PROBE_SYSTEM) :]
    if (
        len(without) >= len(before) + len(after)
        and without.startswith(before)
        and without.endswith(after)
    ):
        return without[len(before) : len(without) - len(after)]
    return ""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    system: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    max_chars: int | None = None,
    tool_call_markers: tuple[str, str] = ("<tool_call>", "</tool_call>"),
) -> str:
    """Render ``messages`` (plus an optional ``system`` prompt and ``tools``) to text.

    Templates that know about tools receive them as ``tools``. For the others the tools
    go into the one system message (:func:`tools_instructions`: schemas and the call
    syntax between ``tool_call_markers``), after its text: the client's system message,
    or else the template's own default system prompt, which is kept.

    Rendered piece by piece: a worker thread whose request was cancelled stops between
    pieces (the client went away), and a render past ``max_chars`` is refused.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system" and system is not None:
        raise ValueError("give the system prompt either as system= or as a first message, not both")
    template_knows_tools = "tools" in template
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        if tools and not template_knows_tools:
            said = tools_instructions(tools, tool_call_markers)
            if msgs and msgs[0].get("role") == "system":
                first = str(msgs[0].get("content") or "")
                msgs[0]["content"] = f"{first}\n\n{said}" if first else said
            else:

                def probe(probe_msgs: list[dict[str, Any]]) -> str:
                    return compiled.render(
                        messages=probe_msgs,
                        tools=None,
                        add_generation_prompt=False,
                        bos_token=bos_token,
                        eos_token=eos_token,
                    )

                default = _default_system(probe)
                msgs.insert(
                    0, {"role": "system", "content": f"{default}\n\n{said}" if default else said}
                )
        pieces = compiled.generate(
            messages=msgs,
            tools=list(tools) if tools and template_knows_tools else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
        out: list[str] = []
        size = 0
        for i, piece in enumerate(pieces):
            out.append(piece)
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise ValueError(f"the chat template rendered more than {max_chars} characters")
            if i % 256 == 255:
                cancel_point()
        return "".join(out)
    except TemplateError as exc:
        # The template's own words (raise_exception: "roles must alternate ...").
        raise ValueError(f"chat template failed to render: {exc}") from exc
    except ValueError:
        raise
    except Exception as exc:  # (a cancellation is a BaseException: it passes)
        # A template's own code failing on odd input (a TypeError ...): its text is a
        # Python detail, not something the client can act on. Logged with its traceback.
        log.warning("chat template failed to render", exc_info=True)
        raise ValueError(
            "chat template failed to render these messages (an unexpected value in them)"
        ) from exc


def cancel_point() -> None:
    """Raise the host task's cancellation if this worker thread's request was cancelled
    (its client went away while its prompt renders). Outside an anyio worker thread,
    nothing."""
    with contextlib.suppress(RuntimeError):  # RuntimeError: not an anyio worker thread
        anyio.from_thread.check_cancelled()


def split_verbatim(
    text: str, verbatim: Sequence[tuple[str, Sequence[int]]]
) -> list[str | list[int]]:
    """``text`` cut around the occurrences of each verbatim text, in order: text pieces to
    tokenize, and the verbatim token ids in their place. Each verbatim text is taken at its
    first occurrence after the previous one taken (two replies with the same text are two
    occurrences, each with its own ids); one that is absent there is skipped."""
    out: list[str | list[int]] = []
    pos = 0
    for reply, ids in verbatim:
        at = text.find(reply, pos) if reply else -1
        if at < 0:
            continue
        if at > pos:
            out.append(text[pos:at])
        out.append(list(ids))
        pos = at + len(reply)
    if pos < len(text):
        out.append(text[pos:])
    return out
