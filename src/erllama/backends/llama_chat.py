"""Rendering a GGUF's own ``tokenizer.chat_template`` (Jinja) in a sandbox.

llama.cpp's ``llama_chat_apply_template`` only recognises a fixed list of templates by
heuristics and knows nothing of tools; the GGUF carries the real Jinja template, so we render
that, the way the model's authors wrote it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.from_thread

log = logging.getLogger("erllama.backends")

__all__ = ["cancel_point", "render_chat_template", "split_verbatim"]


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tools_as_text(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = ["Available tools:"]
    for tool in tools:
        fn = tool.get("function", tool)
        desc = fn.get("description", "")
        lines.append(f"  - {fn.get('name', '?')}: {desc}" if desc else f"  - {fn.get('name', '?')}")
    return "\n".join(lines)


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
) -> str:
    """Render ``messages`` (plus an optional ``system`` prompt and ``tools``) to text.

    Templates that know about tools receive them as ``tools``; for the others the tool list
    is written into the system message, so the model still sees it.

    Rendered piece by piece: a worker thread whose request was cancelled stops between
    pieces (the client went away), and a render past ``max_chars`` is refused.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system" and system is not None:
        raise ValueError("give the system prompt either as system= or as a first message, not both")
    template_knows_tools = "tools" in template
    system_text = system
    if tools and not template_knows_tools:
        system_text = f"{system}\n\n{_tools_as_text(tools)}" if system else _tools_as_text(tools)
    if system_text is not None:
        msgs.insert(0, {"role": "system", "content": system_text})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
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
    first occurrence after the previous cut; one that is absent is skipped."""
    out: list[str | list[int]] = []
    pos = 0
    found = []
    for reply, ids in verbatim:
        at = text.find(reply, pos) if reply else -1
        if at >= 0:
            found.append((at, reply, ids))
    found.sort(key=lambda f: f[0])
    for at, reply, ids in found:
        if at < pos:
            continue  # overlaps an earlier one
        if at > pos:
            out.append(text[pos:at])
        out.append(list(ids))
        pos = at + len(reply)
    if pos < len(text):
        out.append(text[pos:])
    return out
