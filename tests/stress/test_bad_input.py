"""A catalogue of bad inputs across the public API, each refused with its typed error.

Every case names the exact error type and what it carries: ``InvalidRequest.param``,
``ConfigError.paths``, ``NotSupported.backend``/``.capability``, ``ModelNotFound.model_id``
... After each one the model still serves: nothing was queued or left running, and a cheap
request gets its usual answer.

A case that fails here is a bug in erllama, not in the case: the public API accepted
something it should refuse, or refused it untyped, with the wrong type, or naming the
wrong parameter. Such cases stay, failing, until the API is fixed.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
import erllama_parrot
import pytest

import erllama
from erllama import InvalidRequest, ModelNotFound
from erllama.backends import stub
from erllama.config import structure_config
from erllama.plugins import BackendRegistry

from ..helpers import cold_run, stub_config, unblock_stubs, wait_for
from .conftest import record

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FILE = "bad input"
N_CTX = 64
N_VOCAB = 32_000
WORD = stub.WORD_BASE + 40  # any ordinary vocabulary word
SERVE_PROMPT = [WORD, WORD + 1, WORD + 2]
MESSAGES = [{"role": "user", "content": "hello"}]
#: One call (a refusal, which costs nothing) may take at most this long.
CALL_S = 10.0


@attrs.define(eq=False)
class Ctx:
    """What a case gets: an engine (RAM cache tier on) serving stub model ``mid``."""

    engine: erllama.Engine
    mid: str
    tmp: Path
    registry: BackendRegistry


@attrs.frozen(kw_only=True)
class Bad:
    #: Makes the bad call: returns an awaitable, or raises at once (sync API).
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    #: InvalidRequest.param.
    param: str | None = None
    #: ConfigError.paths, as a set (each reported once).
    paths: frozenset[str] | None = None
    #: Other attributes the error must carry (model_id, backend, capability, operation).
    facts: Mapping[str, object] = attrs.field(factory=dict)
    #: A piece of the message.
    says: str | None = None


CASES: list[Any] = []  # pytest.param(Bad, id=...)


def case(case_id: str, call: Callable[[Ctx], Any], error: type[BaseException], **kw: Any) -> None:
    if "paths" in kw:
        kw["paths"] = frozenset(kw["paths"])
    CASES.append(pytest.param(Bad(call=call, error=error, **kw), id=case_id))


def infer_with(**kw: Any) -> Callable[[Ctx], Any]:
    return lambda c: c.engine.infer(c.mid, "hello world", **kw)


def infer_prompt(prompt: object, **kw: Any) -> Callable[[Ctx], Any]:
    return lambda c: c.engine.infer(c.mid, prompt, **kw)


def adapter_file(c: Ctx, body: bytes = b"STUBLORA" + bytes(range(32))) -> str:
    path = c.tmp / "adapter.lora"
    path.write_bytes(body)
    return str(path)


async def parrot(c: Ctx) -> str:
    """A model whose backend implements no optional capability."""
    return await c.engine.load_model("p", erllama.ModelConfig(backend="parrot", n_ctx=256))


# ---- infer: sampler values and max_tokens -------------------------------------------------

for name, value in [
    ("temperature", -1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", 1e308),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_k", "3"),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("min_p", math.nan),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("repetition_penalty", 1e308),
    ("repetition_penalty", math.inf),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", True),
    ("seed", 1.5),
    ("seed", "7"),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", "10"),
    ("max_tokens", 1.5),
    ("max_tokens", True),
]:
    case(f"infer-{name}={value!r}", infer_with(**{name: value}), InvalidRequest, param=name)

# ---- infer: prompts -------------------------------------------------------------------------

for case_id, prompt in [
    # Documented: "the prompt (non-empty ...)"; the CLI refuses "" too. Text is tokenised
    # with BOS, and a BOS alone is no prompt.
    ("empty-text", ""),
    ("empty-list", []),
    ("id-equal-to-n_vocab", [WORD, N_VOCAB]),
    ("negative-id", [WORD, -1]),
    ("float-id", [WORD, 1.5]),
    ("bool-id", [WORD, True]),
    ("string-in-list", [WORD, "hello"]),
    ("None-in-list", [WORD, None]),
    ("nested-list", [[WORD, WORD]]),
    ("id-beyond-int64", [WORD, 2**63]),
    ("range-past-the-vocabulary", range(N_VOCAB - 2, N_VOCAB + 2)),
    ("bytes", b"hello"),
    ("bytearray", bytearray(b"hello")),
    ("a-mapping", {"role": "user", "content": "hello"}),
    ("a-set", {WORD, WORD + 1}),
    ("None", None),
    ("an-int", 42),
    ("text-longer-than-the-context", "kabo " * 100),
    ("ids-as-long-as-the-context", [WORD] * N_CTX),
    ("lone-surrogate", "hello \ud800 world"),
]:
    case(f"infer-prompt-{case_id}", infer_prompt(prompt), InvalidRequest, param="prompt")
case(
    "infer-prompt-chat-messages",
    infer_prompt(MESSAGES),
    InvalidRequest,
    param="prompt",
    says="apply_chat_template",
)
# thinking is checked to be a bool; add_special is the same kind of flag.
case("infer-add_special='no'", infer_with(add_special="no"), InvalidRequest, param="add_special")

# ---- infer: stop, thinking, sessions, parent keys, grammar -----------------------------------

for case_id, stop, param in [
    ("an-int", 5, "stop"),
    ("bytes", b"x", "stop"),
    ("a-mapping", {"x": 1}, "stop"),
    ("17-strings", [f"s{i}" for i in range(17)], "stop"),
    ("empty-string", "", "stop"),
    ("empty-string-in-list", ["ok", ""], "stop[1]"),
    ("300-bytes", ["x" * 300], "stop[0]"),
    ("258-bytes-in-129-characters", ["é" * 129], "stop[0]"),
    ("non-string-item", ["ok", 5], "stop[1]"),
    ("None-item", [None], "stop[0]"),
    ("lone-surrogate", ["\ud800"], "stop[0]"),
]:
    case(f"infer-stop-{case_id}", infer_with(stop=stop), InvalidRequest, param=param)

for name, values in {
    "thinking": ["yes", 1, None],
    "thinking_budget_tokens": [0, -1, "5", True, 1.5],
    "session_id": ["", 7, b"s", "x" * 257, "x" * 300],
    "parent_key": ["zz", b"\0" * 31, 7, "g" * 64, "0" * 63],
    "grammar": ["", "   ", 5, "root ::= (", 'answer ::= "x"'],
}.items():
    for value in values:
        shown = repr(value) if len(repr(value)) < 24 else f"{type(value).__name__}[{len(value)}]"  # type: ignore[arg-type]
        case(f"infer-{name}={shown}", infer_with(**{name: value}), InvalidRequest, param=name)

case(
    "complete-misspelt-keyword",
    lambda c: c.engine.complete(c.mid, "hello", temprature=0.5),  # type: ignore[call-arg]
    TypeError,
)


async def session_busy(c: Ctx) -> erllama.InferStream:
    slow = await c.engine.load_model("slow", stub_config(n_ctx=N_CTX, step_delay_s=0.01))
    first = await c.engine.infer(slow, [WORD], session_id="s")
    try:
        return await c.engine.infer(slow, [WORD + 1], session_id="s")
    finally:
        await first.aclose()


case(
    "infer-session-already-busy",
    session_busy,
    erllama.SessionBusy,
    facts={"model_id": "slow", "session_id": "s"},
)

# ---- chat and chat templates ----------------------------------------------------------------

for case_id, messages, param in [
    ("a-string", "hello", "messages"),
    ("a-single-mapping", {"role": "user", "content": "hi"}, "messages"),
    ("None", None, "messages"),
    ("item-without-role", [{"content": "hi"}], "messages[0]"),
    ("content-not-a-string", [{"role": "user", "content": 5}], "messages[0]"),
    ("role-not-a-string", [{"role": 1, "content": "hi"}], "messages[0]"),
    ("item-not-a-mapping", ["hi"], "messages[0]"),
    ("second-item-bad", [*MESSAGES, {"role": "user"}], "messages[1]"),
    (
        "lone-surrogate-in-content",
        [{"role": "user", "content": "hi \ud800"}],
        "messages[0].content",
    ),
]:
    case(
        f"apply_chat_template-messages-{case_id}",
        lambda c, m=messages: c.engine.apply_chat_template(c.mid, m),
        InvalidRequest,
        param=param,
    )
for case_id, messages, param in [
    ("a-string", "hello", "messages"),
    ("item-without-role", [{"content": "hi"}], "messages[0]"),
]:
    case(
        f"chat-messages-{case_id}",
        lambda c, m=messages: c.engine.chat(c.mid, m),
        InvalidRequest,
        param=param,
    )
case(
    "chat-temperature=-1",
    lambda c: c.engine.chat(c.mid, MESSAGES, temperature=-1),
    InvalidRequest,
    param="temperature",
)
case(
    "chat-system-not-a-string",
    lambda c: c.engine.chat(c.mid, MESSAGES, system=5),  # type: ignore[arg-type]
    InvalidRequest,
    param="system",
)
case(
    "apply_chat_template-system-lone-surrogate",
    lambda c: c.engine.apply_chat_template(c.mid, MESSAGES, system="be \ud800 brief"),
    InvalidRequest,
    param="system",
)
case(
    "apply_chat_template-tools-not-a-list",
    lambda c: c.engine.apply_chat_template(c.mid, MESSAGES, tools=5),  # type: ignore[arg-type]
    InvalidRequest,
    param="tools",
)
# Like messages[i] and stop[i]: the bad item is named.
case(
    "apply_chat_template-tool-not-a-mapping",
    lambda c: c.engine.apply_chat_template(c.mid, MESSAGES, tools=["search"]),  # type: ignore[list-item]
    InvalidRequest,
    param="tools[0]",
)
for case_id, response_format, param in [
    ("not-a-mapping", "json", "response_format"),
    ("type-xml", {"type": "xml"}, "response_format.type"),
    ("json_schema-without-schema", {"type": "json_schema"}, "response_format.json_schema.schema"),
    (
        "schema-not-an-object",
        {"type": "json_schema", "json_schema": {"schema": 5}},
        "response_format.json_schema.schema",
    ),
]:
    case(
        f"chat-response_format-{case_id}",
        lambda c, rf=response_format: c.engine.chat(c.mid, MESSAGES, response_format=rf),
        InvalidRequest,
        param=param,
    )
case(
    "chat-response_format-and-grammar",
    lambda c: c.engine.chat(
        c.mid, MESSAGES, response_format={"type": "json_object"}, grammar='root ::= "x"'
    ),
    InvalidRequest,
    param="grammar",
)

# ---- unknown models, everywhere ---------------------------------------------------------------

for case_id, call in {
    "infer": lambda c: c.engine.infer("nope", "hello"),
    "complete": lambda c: c.engine.complete("nope", "hello"),
    "chat": lambda c: c.engine.chat("nope", MESSAGES),
    "prefill_only": lambda c: c.engine.prefill_only("nope", "hello"),
    "end_session": lambda c: c.engine.end_session("nope", "s"),
    "tokenize": lambda c: c.engine.tokenize("nope", "hello"),
    "detokenize": lambda c: c.engine.detokenize("nope", [WORD]),
    "apply_chat_template": lambda c: c.engine.apply_chat_template("nope", MESSAGES),
    "embed": lambda c: c.engine.embed("nope", "hello"),
    "longest_cached_prefix": lambda c: c.engine.longest_cached_prefix("nope", "hello"),
    "list_cached_prefixes": lambda c: c.engine.list_cached_prefixes("nope"),
    "unload": lambda c: c.engine.unload("nope"),
    "unload_model": lambda c: c.engine.unload_model("nope"),
    "evict": lambda c: c.engine.evict("nope"),
    "save_all": lambda c: c.engine.save_all("nope"),
    "status": lambda c: c.engine.status("nope"),
    "model_info": lambda c: c.engine.model_info("nope"),
    "queue_depth": lambda c: c.engine.queue_depth("nope"),
    "load_adapter": lambda c: c.engine.load_adapter("nope", adapter_file(c)),
    "unload_adapter": lambda c: c.engine.unload_adapter("nope", 1),
    "set_adapter_scale": lambda c: c.engine.set_adapter_scale("nope", 1, 1.0),
    "list_adapters": lambda c: c.engine.list_adapters("nope"),
}.items():
    case(f"{case_id}-unknown-model", call, ModelNotFound, facts={"model_id": "nope"})
case(
    "infer-model-id-not-a-string",
    lambda c: c.engine.infer(7, "hello"),  # type: ignore[arg-type]
    ModelNotFound,
    facts={"model_id": 7},
)

# ---- text utilities ---------------------------------------------------------------------------

for case_id, text in [("an-int", 5), ("bytes", b"hello"), ("None", None), ("a-list", ["a"])]:
    case(
        f"tokenize-{case_id}",
        lambda c, t=text: c.engine.tokenize(c.mid, t),
        InvalidRequest,
        param="text",
    )
# infer refuses this text as InvalidRequest("prompt"); tokenize lets it reach the backend.
case(
    "tokenize-lone-surrogate",
    lambda c: c.engine.tokenize(c.mid, "hello \ud800"),
    InvalidRequest,
    param="text",
)
for case_id, tokens in [
    ("negative-id", [WORD, -1]),
    ("id-equal-to-n_vocab", [N_VOCAB]),
    ("a-string", "hello"),
    ("float-id", [1.5]),
    ("bool-id", [True]),
    ("an-int", 7),
]:
    case(
        f"detokenize-{case_id}",
        lambda c, t=tokens: c.engine.detokenize(c.mid, t),
        InvalidRequest,
        param="tokens",
    )
for case_id, prompt in [
    ("empty-list", []),
    ("negative-id", [WORD, -1]),
    ("bytes", b"hello"),
    ("an-int", 5),
    ("lone-surrogate", "hello \ud800"),
]:
    case(
        f"embed-{case_id}",
        lambda c, p=prompt: c.engine.embed(c.mid, p),
        InvalidRequest,
        param="prompt",
    )


async def embed_switched_off(c: Ctx) -> list[float]:
    cfg = erllama.ModelConfig(backend="stub", n_ctx=N_CTX, embeddings=False)
    return await c.engine.embed(await c.engine.load_model("noembed", cfg), "hello")


case(
    "embed-switched-off-in-the-config",
    embed_switched_off,
    erllama.NotSupported,
    facts={"backend": "stub", "capability": "embed"},
)

# ---- prefill_only, end_session, routing queries -------------------------------------------------

for case_id, kw, param in [
    ("empty-prompt", {"prompt": []}, "prompt"),
    ("prompt-as-long-as-the-context", {"prompt": [WORD] * N_CTX}, "prompt"),
    ("lone-surrogate", {"prompt": "\ud800"}, "prompt"),
    ("parent_key='zz'", {"prompt": "hello", "parent_key": "zz"}, "parent_key"),
    ("session_id=''", {"prompt": "hello", "session_id": ""}, "session_id"),
]:
    case(
        f"prefill_only-{case_id}",
        lambda c, kw=kw: c.engine.prefill_only(c.mid, **kw),
        InvalidRequest,
        param=param,
    )
for value in ["", 7, None, "x" * 300]:
    shown = repr(value) if len(repr(value)) < 24 else "str[300]"
    case(
        f"end_session-{shown}",
        lambda c, v=value: c.engine.end_session(c.mid, v),
        InvalidRequest,
        param="session_id",
    )
# The routing query takes any prompt infer takes, and should refuse what infer refuses.
for case_id, prompt in [
    ("negative-id", [WORD, -1]),
    ("float-id", [WORD, 1.5]),
    ("id-equal-to-n_vocab", [WORD, N_VOCAB]),
    ("bytes", b"hello"),
    ("an-int", 7),
]:
    case(
        f"longest_cached_prefix-{case_id}",
        lambda c, p=prompt: c.engine.longest_cached_prefix(c.mid, p),
        InvalidRequest,
        param="prompt",
    )

# ---- operator calls --------------------------------------------------------------------------

for value in [-1, "x", True, 1.5, None]:
    case(
        f"evict_bytes-{value!r}",
        lambda c, v=value: c.engine.evict_bytes(v),
        InvalidRequest,
        param="n_bytes",
    )
# A bad argument, not a failing cache (and a bare string is not a list of three tiers).
for case_id, tiers in [("unknown-tier", ("nvme",)), ("a-bare-string", "ram")]:
    case(
        f"evict_bytes-tiers-{case_id}",
        lambda c, t=tiers: c.engine.evict_bytes(1, t),
        InvalidRequest,
        param="tiers",
    )


async def cancel_a_stream(c: Ctx) -> None:
    stream = await c.engine.infer(c.mid, SERVE_PROMPT, max_tokens=1)
    try:
        c.engine.cancel(stream)  # type: ignore[arg-type]
    finally:
        await stream.aclose()


case("cancel-a-stream", cancel_a_stream, TypeError)
for value in [None, 7, b"m#1"]:
    case(f"cancel-{value!r}", lambda c, v=value: c.engine.cancel(v), TypeError)

# ---- adapters ---------------------------------------------------------------------------------

case(
    "load_adapter-missing-file",
    lambda c: c.engine.load_adapter(c.mid, str(c.tmp / "missing.lora")),
    InvalidRequest,
    param="path",
)
case(
    "load_adapter-empty-path",
    lambda c: c.engine.load_adapter(c.mid, ""),
    InvalidRequest,
    param="path",
)
case(
    "load_adapter-a-directory",
    lambda c: c.engine.load_adapter(c.mid, str(c.tmp)),
    InvalidRequest,
    param="path",
)
case(
    "load_adapter-not-an-adapter",
    lambda c: c.engine.load_adapter(c.mid, adapter_file(c, b"not a lora at all")),
    erllama.BackendError,
    facts={"backend": "stub", "operation": "adapter_load"},
)
case(
    "set_adapter_scale-unknown-handle",
    lambda c: c.engine.set_adapter_scale(c.mid, 99, 1.0),
    InvalidRequest,
    param="handle",
)
for value in [math.nan, math.inf, "1", True, None]:
    case(
        f"set_adapter_scale-{value!r}",
        lambda c, v=value: c.engine.set_adapter_scale(c.mid, 1, v),
        InvalidRequest,
        param="scale",
    )


async def huge_adapter_scale(c: Ctx) -> None:
    handle = await c.engine.load_adapter(c.mid, adapter_file(c))
    await c.engine.set_adapter_scale(c.mid, handle, 1e308)


# Sampler values are bounded (1e308 overflows a sampler); an adapter scale is not.
case("set_adapter_scale-1e308", huge_adapter_scale, InvalidRequest, param="scale")

# ---- optional capabilities on a backend without them -------------------------------------------

for case_id, call, capability in [
    (
        "apply_chat_template",
        lambda c, p: c.engine.apply_chat_template(p, MESSAGES),
        "chat_template",
    ),
    ("chat", lambda c, p: c.engine.chat(p, MESSAGES), "chat_template"),
    ("embed", lambda c, p: c.engine.embed(p, "hello"), "embed"),
    ("infer-temperature", lambda c, p: c.engine.infer(p, "hello", temperature=0.7), "sampler"),
    ("infer-grammar", lambda c, p: c.engine.infer(p, "hello", grammar='root ::= "a"'), "grammar"),
    ("load_adapter", lambda c, p: c.engine.load_adapter(p, adapter_file(c)), "adapters"),
    ("set_adapter_scale", lambda c, p: c.engine.set_adapter_scale(p, 1, 1.0), "adapters"),
    ("unload_adapter", lambda c, p: c.engine.unload_adapter(p, 1), "adapters"),
]:

    async def unsupported(c: Ctx, call: Callable[[Ctx, str], Any] = call) -> Any:
        return await call(c, await parrot(c))

    case(
        f"{case_id}-not-supported",
        unsupported,
        erllama.NotSupported,
        facts={"backend": "parrot", "capability": capability},
    )

# ---- models and configuration -------------------------------------------------------------------

STUB = {"backend": "stub", "n_ctx": N_CTX}
for case_id, cfg, paths in [
    ("n_ctx=4", {**STUB, "n_ctx": 4}, ["n_ctx"]),
    ("n_seq_max=0", {**STUB, "n_seq_max": 0}, ["n_seq_max"]),
    (
        "four-bad-keys",
        {**STUB, "n_ctx": "big", "n_batch": 0, "bogus": 1, "type_k": "q3"},
        ["n_ctx", "n_batch", "bogus", "type_k"],
    ),
    ("unknown-backend", {**STUB, "backend": "nope"}, ["backend"]),
    (
        "nested-policy",
        {**STUB, "policy": {"min_tokens": 0, "bogus": 1}},
        ["policy.min_tokens", "policy.bogus"],
    ),
    (
        "empty-thinking-marker",
        {**STUB, "thinking_markers": {"start": "", "end": "</think>"}},
        ["thinking_markers.start"],
    ),
]:
    case(
        f"load_model-{case_id}",
        lambda c, cfg=cfg: c.engine.load_model("m2", cfg),
        erllama.ConfigError,
        paths=paths,
    )
case(
    "load_model-no-config",
    lambda c: c.engine.load_model("m2"),
    erllama.ConfigError,
    paths=["config"],
)
case(
    "load_model-config-is-a-string",
    lambda c: c.engine.load_model("m2", "stub"),  # type: ignore[arg-type]
    erllama.ConfigError,
    paths=["config"],
)
case(
    "load_model-id-taken",
    lambda c: c.engine.load_model("m", stub_config()),
    erllama.ModelAlreadyLoaded,
    facts={"model_id": "m"},
)
for case_id, model_id in [("empty", ""), ("an-int", 7)]:
    case(
        f"load_model-id-{case_id}",
        lambda c, i=model_id: c.engine.load_model(i, stub_config()),
        InvalidRequest,
        param="model_id",
    )
case(
    "load_model-missing-model-file",
    lambda c: c.engine.load_model(
        "m2", erllama.ModelConfig(backend="stub", model_path=c.tmp / "missing.gguf", n_ctx=N_CTX)
    ),
    erllama.BackendError,
    facts={"backend": "stub", "operation": "load"},
)
for case_id, kw, paths in [
    ("n_ctx=4", {"n_ctx": 4}, ["n_ctx"]),
    ("n_batch-below-n_seq_max", {"n_batch": 2, "n_seq_max": 4}, ["n_batch"]),
    (
        "five-bad-fields",
        {"n_ctx": True, "max_queue": -1, "seed": -1, "type_v": "f8", "fingerprint": "zz"},
        ["n_ctx", "max_queue", "seed", "type_v", "fingerprint"],
    ),
]:
    case(
        f"ModelConfig-{case_id}",
        lambda c, kw=kw: erllama.ModelConfig(backend="stub", **kw),
        erllama.ConfigError,
        paths=paths,
    )
case(
    "structure_config-EngineConfig-four-bad-keys",
    lambda c: structure_config(
        {
            "cache": {"ram_bytes": -1, "writers": 0},
            "models": {"a": {"backend": "stub", "n_ctx": 2}},
            "extra": 1,
        },
        erllama.EngineConfig,
    ),
    erllama.ConfigError,
    paths=["cache.ram_bytes", "cache.writers", "models.a.n_ctx", "extra"],
)
# The rule is 0 <= low < high <= 1; with the default low watermark, the bad key is high's.
case(
    "structure_config-high_watermark=2",
    lambda c: structure_config({"pressure": {"high_watermark": 2}}, erllama.EngineConfig),
    erllama.ConfigError,
    paths=["pressure.high_watermark"],
)


async def open_with_bad_config(c: Ctx) -> None:
    async with erllama.open_engine({"cache": {"bogus": 1}}, backends=c.registry):
        pass


case("open_engine-unknown-key", open_with_bad_config, erllama.ConfigError, paths=["cache.bogus"])
case(
    "load_config-missing-file",
    lambda c: erllama.load_config(c.tmp / "missing.toml"),
    erllama.ConfigError,
    paths=[""],
)


# ---- the test ---------------------------------------------------------------------------------


@pytest.fixture
def registry() -> BackendRegistry:
    return erllama.make_backend_registry({"stub": stub, "parrot": erllama_parrot}, autoload=False)


@pytest.fixture
async def ctx(registry: BackendRegistry, tmp_path: Path) -> AsyncIterator[Ctx]:
    cfg = erllama.EngineConfig(cache=erllama.CacheConfig(ram_file_dir=None, disk_dir=None))
    async with erllama.open_engine(cfg, backends=registry) as engine:
        try:
            mid = await engine.load_model("m", stub_config(n_ctx=N_CTX))
            yield Ctx(engine, mid, tmp_path, registry)
        finally:
            unblock_stubs()


_SERVED: list[tuple[int, ...]] = []


async def still_serves(c: Ctx) -> None:
    """Nothing of the refused call is left, and the model answers as it always does."""
    engine = c.engine
    # A request a case started itself (and closed) ends within a step.
    await wait_for(lambda: not engine.in_flight())
    info = engine.model_info(c.mid)
    assert (info.status, info.queue_len, info.running, info.error) == ("idle", 0, 0, None)
    assert "m2" not in {i.id for i in engine.list_models()}  # a failed load leaves nothing
    got = await engine.complete(c.mid, SERVE_PROMPT, max_tokens=2)
    assert got.finish_reason == "length" and len(got.token_ids) == 2
    if not engine.list_adapters(c.mid):
        if not _SERVED:
            cold = await cold_run(c.registry, SERVE_PROMPT, max_tokens=2)
            _SERVED.append(cold.token_ids)
        assert got.token_ids == _SERVED[0]


async def dispose(result: object) -> None:
    if isinstance(result, erllama.InferStream):
        await result.aclose()


@pytest.mark.parametrize("bad", CASES)
async def test_bad_input_is_refused_with_its_typed_error(ctx: Ctx, bad: Bad) -> None:
    with anyio.fail_after(CALL_S), pytest.raises(bad.error) as info:
        result = bad.call(ctx)
        if inspect.isawaitable(result):
            result = await result
        await dispose(result)  # accepted: the case fails, and leaves nothing running
    exc = info.value
    if bad.param is not None:
        assert isinstance(exc, InvalidRequest) and exc.param == bad.param, exc
    if bad.paths is not None:
        assert isinstance(exc, erllama.ConfigError)
        assert sorted(exc.paths) == sorted(bad.paths), exc
    for attr, value in bad.facts.items():
        assert getattr(exc, attr) == value, f"{attr}: {exc}"
    if bad.says is not None:
        assert bad.says in str(exc)
    record(f"{FILE}: inputs refused", 1)
    await still_serves(ctx)


def test_the_catalogue_is_large() -> None:
    record(f"{FILE}: catalogue size", len(CASES))
    assert len(CASES) >= 120


# ---- a million token ids -------------------------------------------------------------------------

#: How late a 1 ms sleep of another task may wake while the loop checks a huge prompt.
LATE_S = 0.05


async def test_a_million_token_ids_are_refused_at_once_while_the_loop_keeps_time(
    ctx: Ctx,
) -> None:
    engine, mid = ctx.engine, ctx.mid
    million = [WORD] * 1_000_000
    calls: dict[str, Callable[[], Any]] = {
        "infer": lambda: engine.infer(mid, million),
        "infer-tuple": lambda: engine.infer(mid, tuple(million)),
        "infer-sampled": lambda: engine.infer(mid, million, temperature=0.5, seed=1),
        "complete": lambda: engine.complete(mid, million, max_tokens=1),
        "prefill_only": lambda: engine.prefill_only(mid, million),
    }
    lateness: list[float] = []
    took: dict[str, float] = {}

    async def heartbeat(stop: anyio.Event) -> None:
        # The measurement itself: how late a 1 ms sleep wakes while the calls run.
        while not stop.is_set():
            t0 = time.monotonic()
            await anyio.sleep(0.001)
            lateness.append(time.monotonic() - t0 - 0.001)

    async def beats() -> None:
        """Until the heartbeat has beaten once more."""
        n = len(lateness)
        await wait_for(lambda: len(lateness) > n)

    stop = anyio.Event()
    with anyio.fail_after(CALL_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat, stop)
            await beats()
            for name, call in calls.items():
                t0 = time.monotonic()
                with pytest.raises(InvalidRequest) as info:
                    await call()
                took[name] = time.monotonic() - t0
                assert info.value.param == "prompt"
                await beats()  # a heartbeat between the calls
            stop.set()
    assert max(took.values()) < 1.0, took
    assert lateness and max(lateness) < LATE_S, f"a 1 ms sleep woke {max(lateness):.3f} s late"
    record(f"{FILE}: million-id prompts refused", len(calls))
    await still_serves(ctx)


async def test_a_refused_adapter_scale_leaves_the_model_serving_as_before(ctx: Ctx) -> None:
    engine, mid = ctx.engine, ctx.mid
    handle = await engine.load_adapter(mid, adapter_file(ctx))
    before = await engine.complete(mid, SERVE_PROMPT, max_tokens=4)
    adapters = engine.list_adapters(mid)
    # However the call is refused (the catalogue pins how), it must change nothing.
    refused: Exception | None = None
    try:
        await engine.set_adapter_scale(mid, handle, 1e308)
    except Exception as exc:
        refused = exc
    assert refused is not None, "a scale of 1e308 was accepted"
    assert engine.list_adapters(mid) == adapters
    after = await engine.complete(mid, SERVE_PROMPT, max_tokens=4)
    assert after.token_ids == before.token_ids
