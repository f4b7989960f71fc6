"""Request fields both APIs take the same way: sampling, ``max_tokens``, the ``erllama``
extension object, and tool definitions once parsed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..config import MAX_DRAFT
from ..grammar import check_schema
from .body import Fields
from .errors import ApiError
from .keepalive import parse_keep_alive
from .state import ServerState
from .toolcalls import NAME_RE

__all__ = [
    "cache_salt",
    "check_messages",
    "explain_cache",
    "extension_options",
    "max_tokens",
    "sampling",
    "sampling_renames",
    "tool_spec",
]

#: Longest ``cache_salt`` a request may send.
MAX_REQUEST_SALT = 256


def max_tokens(
    body: Fields, state: ServerState, names: Sequence[str], default: int | None
) -> tuple[int, str]:
    """The request's token limit (the first of ``names`` given), at most the server's cap;
    ``default`` (or the cap) when none is given. Returns it with the field's name."""
    cap = state.config.server.max_tokens
    for name in names:
        value = body.integer(name, minimum=1)
        if value is not None:
            if value > cap:
                raise body.bad(name, f"must be <= {cap} (this server's cap), got {value}")
            return value, name
    return min(default or cap, cap), names[0]


def sampling(body: Fields, state: ServerState) -> dict[str, Any]:
    """temperature, top_p, seed, OpenAI's presence and frequency penalties and
    ``logit_bias``, and llama.cpp-style extras given at the top level, as OpenAI clients'
    ``extra_body`` sends them: top_k, min_p, repetition_penalty (llama-server's
    ``repeat_penalty``), penalty_last_n (its ``repeat_last_n``). Ranges beyond these types
    are checked by the engine, which names the field (see :func:`sampling_renames`)."""
    out: dict[str, Any] = {}
    temperature = body.number("temperature", minimum=0, maximum=2)
    out["temperature"] = (
        temperature if temperature is not None else state.config.server.default_temperature
    )
    for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty"):
        value = body.number(name)
        if value is not None:
            out[name] = value
    for name, alias in (("repetition_penalty", "repeat_penalty"),):
        value = body.number(name)
        value = body.number(alias) if value is None else value
        if value is not None:
            out[name] = value
    top_k = body.integer("top_k", minimum=0)
    if top_k is not None:
        out["top_k"] = top_k
    last_n = body.integer("penalty_last_n")
    last_n = body.integer("repeat_last_n") if last_n is None else last_n
    if last_n is not None:
        out["penalty_last_n"] = last_n
    bias = body.obj("logit_bias")
    if bias is not None and bias.data:
        out["logit_bias"] = dict(bias.data)  # ids as decimal strings; the engine checks them
    seed = body.integer("seed")
    if seed is not None:
        out["seed"] = seed
    out.update(speculative(body))
    return out


def speculative(body: Fields) -> dict[str, Any]:
    """Speculative decoding per request: ``speculative`` (true/false, erllama's) and
    llama-server's ``speculative.n_max`` (the longest draft; 0 turns drafting off). The
    engine refuses ``speculative: true`` where it cannot apply, naming why."""
    out: dict[str, Any] = {}
    if body.get("speculative") is not None:
        out["speculative"] = body.flag("speculative")
    n_max = body.integer("speculative.n_max", minimum=0, maximum=MAX_DRAFT)
    if n_max is not None:
        out["draft_max"] = n_max
    return out


def sampling_renames(body: Fields) -> dict[str, str]:
    """The request's names for the engine's sampling keywords where they differ
    (llama-server's ``repeat_penalty`` and ``repeat_last_n``), for errors."""
    out = {}
    if body.get("repetition_penalty") is None and body.get("repeat_penalty") is not None:
        out["repetition_penalty"] = "repeat_penalty"
    if body.get("penalty_last_n") is None and body.get("repeat_last_n") is not None:
        out["penalty_last_n"] = "repeat_last_n"
    return out


def cache_salt(body: Fields, scope: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's ``cache_salt`` for this request: its API key's salt (set by the key
    check unless ``server.share_cache_across_keys``) and the request's own ``cache_salt``
    field (vLLM's name), so a client may also keep its own requests apart."""
    key_salt = (scope.get("state") or {}).get("cache_salt")
    own = body.text("cache_salt", empty=False)
    if own is not None and len(own) > MAX_REQUEST_SALT:
        raise body.bad("cache_salt", f"must be at most {MAX_REQUEST_SALT} characters")
    if own is None and key_salt is None:
        return {}
    parts = [p for p in (key_salt, own) if p is not None]
    return {"cache_salt": "\x1f".join(parts)}


def check_messages(messages: Sequence[object], state: ServerState) -> None:
    """At most ``server.max_messages`` messages go to the chat template: each is rendered
    and tokenized, on a worker thread that a vanished client can only stop between
    pieces, so the work is bounded before it starts."""
    limit = state.config.server.max_messages
    if len(messages) > limit:
        raise ApiError.bad_param(
            "messages", f"at most {limit} messages per request (server.max_messages)"
        )


def extension_options(body: Fields) -> dict[str, Any]:
    """The ``erllama`` object: ``session_id``, ``parent_key`` and ``keep_alive`` (Ollama's
    meaning: seconds or a duration such as ``"5m"``; 0 unloads the model after the
    request, a negative value keeps it loaded for good). ``keep_alive`` is not an engine
    option: :func:`generation.start` takes it out. ``explain_cache`` is read by
    :func:`explain_cache`, not here."""
    ext = body.obj("erllama")
    if ext is None:
        return {}
    out: dict[str, Any] = {}
    for name in ("session_id", "parent_key"):
        value = ext.text(name, empty=False)
        if value is not None:
            out[name] = value
    if ext.get("keep_alive") is not None:
        try:
            out["keep_alive"] = parse_keep_alive(ext.get("keep_alive"))
        except ValueError as exc:
            raise ext.bad("keep_alive", str(exc)) from None
    explain_cache(body)
    unknown = sorted(set(ext.data) - {"session_id", "parent_key", "keep_alive", "explain_cache"})
    if unknown:
        raise ext.bad(
            unknown[0],
            "unknown field (erllama takes session_id, parent_key, keep_alive, explain_cache)",
        )
    return out


def explain_cache(body: Fields) -> bool:
    """``erllama.explain_cache``: the response's ``erllama.cache.explain`` says why the
    prompt was restored as far as it was (off unless asked: it shows prompt text)."""
    ext = body.obj("erllama")
    return ext.flag("explain_cache") if ext is not None else False


#: The engine's names for fields of the ``erllama`` object.
EXTENSION_RENAMES = {
    "session_id": "erllama.session_id",
    "parent_key": "erllama.parent_key",
    "keep_alive": "erllama.keep_alive",
}


def tool_spec(
    f: Fields, name_field: str, description_field: str, params_field: str
) -> tuple[str, dict[str, Any]]:
    """One tool as the chat template takes it (OpenAI's function spec), and its name."""
    name = f.req_text(name_field)
    if not NAME_RE.fullmatch(name):
        raise f.bad(name_field, "must be 1 to 128 letters, digits, '_', '-', '.' or ':'")
    spec: dict[str, Any] = {"name": name}
    description = f.text(description_field)
    if description:
        spec["description"] = description
    params = f.obj(params_field)
    if params is not None:
        kind = params.data.get("type")
        if kind is not None and kind != "object":
            raise f.bad(params_field, "must be a JSON schema of type object")
        check_schema(params.data, f.name(params_field))
        spec["parameters"] = dict(params.data)
    return name, {"type": "function", "function": spec}


def functions_of(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any] | None]:
    return {t["function"]["name"]: t["function"].get("parameters") for t in tools}


def unique(names: Sequence[str], field: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ApiError.bad_param(f"{field}[{i}]", f"a second tool named {name!r}")
        seen.add(name)
