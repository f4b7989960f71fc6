"""``backend="stub"``: a deterministic fake model for fast tests and benchmarks.

No weights. Tokens come from words; the next token is a pure function of the sequence's
whole context (a rolling hash kept alongside it), the sampler settings and seed, and the
active adapter set. ``kv_pack`` serialises that context, so restoring a packed state and
decoding on gives exactly what the unbroken run gives.

Vocabulary (``n_vocab`` ids, default 32,000):

* 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (end of generation), 3 ``<pad>``;
* 4..259: one raw byte each (byte fallback, so non-ASCII text round-trips exactly and a
  multi-byte character can be split across tokens);
* 260..: syllable words (``kabo``, ``rite`` ...). Any other word is spelt in byte tokens, so
  ``detokenize(tokenize(text))`` gives the text back with its whitespace collapsed.

Every optional hook is implemented: a chat template, a hashed embedding, a sampler with a
small GBNF subset (string literals, alternation, sequences, groups, rule references) that
really constrains output, and adapters that change output unless their scale is 0.

Test controls, given in ``ModelConfig.options``: ``n_vocab``, ``n_ctx`` (else the config's),
``eog_every`` (end generation when the context hash says so, on average every N tokens;
0 = never), ``step_delay_s`` (sleep in the model thread each step), ``fail_at``
(``"load"``, ``"step"``, ``"pack"``, ``"unpack"``, ``"seq_rm"``, ``"sample"``), ``fail_step``
(with ``fail_at="step"``: fail on that step number, counting from 1), ``fail_seed`` (with
``fail_at="sample"``: sampling fails for requests with that seed; the others carry on),
``embed_dim``, ``script`` (text or token ids every request emits in order, whatever its
sampler, then end of generation: for markers and stop strings split across tokens),
``after_tool`` (with a script: what a request whose prompt holds a tool result, a message
of role ``tool``, emits instead; an agent's loop then ends after one call),
``chat_template`` (a template source the stub reports, for marker detection; it renders
its own simple format), and ``control``: a :class:`StubControl` whose gates, permits and
counters let a test hold and watch the model thread.
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .._version import __version__
from ..config import ModelConfig
from ..errors import InvalidRequest
from ..sampling import SamplerParams
from .hookspecs import hookimpl
from .llama_chat import split_verbatim
from .stub_grammar import expand, parse_gbnf
from .types import (
    ChatMessage,
    Decode,
    LoadedModel,
    Prefill,
    Prefilled,
    Sampled,
    SeqFailed,
    StepOp,
    StepResult,
)

UNK, BOS, EOS, PAD = 0, 1, 2, 3
BYTE_BASE = 4
WORD_BASE = BYTE_BASE + 256
SPECIALS = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, "<pad>": PAD}
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables
_MASK = (1 << 64) - 1
_STATE_MAGIC = b"ERSTUBKV"


def _mix(*values: int) -> int:
    """splitmix64 folded over ``values``: cheap, well-spread, and stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h


def _word(n: int) -> str:
    # Bijective base-70 numeral with syllable digits: distinct ids give distinct words.
    out = []
    n += 1
    while n:
        n, r = divmod(n - 1, len(_SYLLABLES))
        out.append(_SYLLABLES[r])
    return "".join(reversed(out))


_SYL_RE = re.compile("(?:" + "|".join(_SYLLABLES) + ")+")


def _word_index(word: str) -> int | None:
    if not _SYL_RE.fullmatch(word):
        return None
    n = 0
    for i in range(0, len(word), 2):
        n = n * len(_SYLLABLES) + _SYLLABLES.index(word[i : i + 2]) + 1
    return n - 1


#: Steps a stub model remembers by default (about 90 bytes each).
HISTORY_STEPS = 65_536


@attrs.define(eq=False)
class StubControl:
    """Knobs a test holds on to while the model runs (all read from the worker thread)."""

    #: When set to an Event, every step waits for it (the test releases the model).
    gate: threading.Event | None = None
    #: When set, every step takes one permit first: the test meters steps one by one.
    permits: threading.Semaphore | None = None
    #: When set to an Event, a decode waits for it after sampling, as if its forward pass
    #: were running (tests watch the sampled token stream before the step returns).
    forward_gate: threading.Event | None = None
    #: Steps currently executing (a test checks none is left running after shutdown).
    active: int = 0
    #: Steps currently waiting at ``gate``, for a permit, or at ``forward_gate``: tests wait
    #: for "step N is parked" with ``steps == N and waiting == 1``.
    waiting: int = 0
    #: Set each time a step starts; tests wait on it to know the model is mid-step.
    step_entered: threading.Event = attrs.Factory(threading.Event)
    step_delay_s: float = 0.0
    fail_at: str | None = None
    fail_step: int | None = None
    #: With ``fail_at="sample"``: sampling for a request with this seed raises, as a sampler
    #: that overflows would (that request fails; the model serves on).
    fail_seed: int | None = None
    #: When set to an Event, ``kv_pack`` waits for it (tests hold a save mid-flight).
    pack_gate: threading.Event | None = None
    #: When set to an Event, ``load`` waits for it (tests watch a model while it loads).
    load_gate: threading.Event | None = None
    steps: int = 0
    #: How many of the latest steps ``history`` keeps (None: all; only for a test that
    #: needs every step of a long run).
    history_limit: int | None = HISTORY_STEPS
    #: The latest steps' ops, for tests that check batching. Bounded: a stub model that
    #: serves for long (``erllama serve`` on the stub) kept every step (about 263 KiB per
    #: 3,000-token request).
    history: deque[tuple[StepOp, ...]] = attrs.Factory(
        lambda self: deque(maxlen=self.history_limit), takes_self=True
    )
    #: Vocabulary calls (tokenize, detokenize, the chat template, sampler_new) take this
    #: long, as a long text would on a real model: tests widen the window an unload races.
    native_delay_s: float = 0.0
    #: Calls that found their model already freed (a real backend would crash there), and
    #: frees of a freed model.
    use_after_free: int = 0
    #: The model this control drives (set when it loads).
    model: StubModel | None = None

    def open(self) -> None:
        """Let every step run from now on, whatever gates and permits were set (a test that
        failed holding a model mid-step still lets its engine close)."""
        permits, self.permits = self.permits, None
        if permits is not None:
            # Wake whoever waits already; later steps see no semaphore at all. (Releasing
            # a million permits instead costs a quarter of a second of notify calls.)
            permits.release(self.waiting + 1)
        for gate in (self.gate, self.forward_gate, self.pack_gate, self.load_gate):
            if gate is not None:
                gate.set()
        self.gate = self.forward_gate = None


@attrs.define(eq=False)
class _Seq:
    tokens: list[int] = attrs.Factory(list)
    rolling: list[int] = attrs.Factory(lambda: [0])  # rolling[i] = hash of tokens[:i]
    has_logits: bool = False
    #: With a script: how many of its tokens this sequence has emitted since it was last
    #: cleared, trimmed or restored (a new request starts the script again).
    script_pos: int = 0

    def append(self, tok: int) -> None:
        self.tokens.append(tok)
        self.rolling.append(_mix(self.rolling[-1], tok))

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        del self.rolling[n + 1 :]
        self.script_pos = 0


@attrs.define(eq=False)
class _Sampler:
    params: SamplerParams
    #: Token sequences the grammar accepts (None: unconstrained).
    allowed: list[tuple[int, ...]] | None
    generated: list[int] = attrs.Factory(list)


@attrs.define(eq=False)
class StubModel:
    n_ctx: int
    n_vocab: int
    n_seq_max: int
    eog_every: int
    embed_dim: int
    control: StubControl
    #: Scripted output: every request's decodes emit these tokens in order (whatever the
    #: sampler), then the end-of-generation token.
    script: tuple[int, ...] | None = None
    #: What a request whose prompt holds a tool result emits instead of ``script``.
    after_tool: tuple[int, ...] | None = None
    seqs: dict[int, _Seq] = attrs.Factory(dict)
    adapters: dict[int, bytes] = attrs.Factory(dict)
    active: tuple[tuple[int, float], ...] = ()
    next_adapter: int = 1
    freed: bool = False
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def seq(self, seq: int) -> _Seq:
        if not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence {seq} out of range (n_seq_max={self.n_seq_max})")
        return self.seqs.setdefault(seq, _Seq())

    def adapter_mix(self) -> int:
        h = 0
        for handle, scale in sorted(self.active):
            if scale != 0:
                digest = int.from_bytes(self.adapters[handle][:8], "little")
                h = _mix(h, digest, round(scale * 2**16))
        return h

    def fail(self, where: str) -> None:
        if self.control.fail_at == where:
            raise RuntimeError(f"stub: injected failure at {where}")

    def check_alive(self) -> None:
        """Where a real backend would crash on freed memory, the stub counts and raises."""
        if self.freed:
            self.control.use_after_free += 1
            raise RuntimeError("stub: the model was used after it was freed")

    def native_call(self) -> None:
        """A vocabulary call: alive before and after its (optional) delay."""
        self.check_alive()
        if self.control.native_delay_s:
            time.sleep(self.control.native_delay_s)
            self.check_alive()


# ---- hooks --------------------------------------------------------------------------------


def _control(options: Mapping[str, Any]) -> StubControl:
    control = options.get("control")
    if control is None:
        control = StubControl()
    elif not isinstance(control, StubControl):
        raise TypeError("options['control'] must be a StubControl")
    for key in ("step_delay_s", "fail_at", "fail_step", "fail_seed"):
        if key in options:
            setattr(control, key, options[key])
    return control


@hookimpl
def load(config: ModelConfig) -> LoadedModel:
    opts = config.options
    control = _control(opts)
    if control.load_gate is not None:
        _park(control, control.load_gate.wait)
    if control.fail_at == "load":
        raise RuntimeError("stub: injected failure at load")
    fingerprint = None
    if config.model_path is not None and not Path(config.model_path).is_file():
        raise FileNotFoundError(f"no such model file: {config.model_path}")
    n_vocab = int(opts.get("n_vocab", 32_000))
    if n_vocab <= WORD_BASE + 16:
        raise ValueError(f"n_vocab must be > {WORD_BASE + 16}")
    n_ctx = int(opts.get("n_ctx", config.n_ctx))
    if config.model_path is None:
        # No file: the identity is the stub's own settings (never all zeros).
        fingerprint = hashlib.sha256(f"erllama-stub:{n_vocab}".encode()).hexdigest()
    model = StubModel(
        n_ctx=n_ctx,
        n_vocab=n_vocab,
        n_seq_max=config.n_seq_max,
        eog_every=int(opts.get("eog_every", 0)),
        embed_dim=int(opts.get("embed_dim", 32)),
        control=control,
    )
    control.model = model
    _LIVE.add(control)
    script = opts.get("script")
    if script is not None:
        if isinstance(script, str):
            script = _tokenize(model, script, add_special=False, parse_special=True)
        model.script = tuple(int(t) for t in script)
    after_tool = opts.get("after_tool")
    if after_tool is not None:
        model.after_tool = tuple(
            _tokenize(model, after_tool, add_special=False, parse_special=True)
        )
    return LoadedModel(
        handle=model,
        n_ctx=n_ctx,
        n_vocab=n_vocab,
        n_seq_max=config.n_seq_max,
        quant="f32",
        fingerprint=fingerprint,
        kv_layout={"backend": "stub", "version": __version__, "n_ctx": n_ctx},
        eog_tokens=frozenset({EOS}),
        metadata={"architecture": "stub", "n_vocab": str(n_vocab)},
        chat_template=opts.get("chat_template"),
        features=frozenset({"logprobs", "speculative"}),
        # The stub's cells are a pure function of the tokens: reuse needs no grid (a test
        # turns this off to exercise the engine's exactness rule).
        batch_invariant=bool(opts.get("batch_invariant", True)),
    )


@hookimpl
def free(model: StubModel) -> None:
    model.check_alive()  # a double free
    model.freed = True
    model.seqs.clear()
    _LIVE.discard(model.control)


#: Controls of stub models not yet freed (see :func:`live_controls`).
_LIVE: weakref.WeakSet[StubControl] = weakref.WeakSet()


def live_controls() -> list[StubControl]:
    """The controls of every stub model loaded and not yet freed, in this process: tests
    open them all (:meth:`StubControl.open`) so that a failed test still lets its engine
    close."""
    return list(_LIVE)


def _tokenize_word(model: StubModel, word: str, first: bool) -> list[int]:
    idx = _word_index(word)
    if idx is not None and WORD_BASE + idx < model.n_vocab:
        return [WORD_BASE + idx]
    # Byte fallback: lossless for any text, and splits multi-byte characters across tokens.
    raw = word.encode("utf-8") if first else b" " + word.encode("utf-8")
    return [BYTE_BASE + b for b in raw]


def _script_for(model: StubModel, seq: _Seq) -> tuple[int, ...]:
    """The model's script, or ``after_tool`` when the request's prompt (the tokens before
    what the script emitted) holds a tool result (``tool:``, as the stub's template writes
    a message of role tool)."""
    assert model.script is not None
    if model.after_tool is None:
        return model.script
    word = tuple(_tokenize_word(model, "tool:", first=False))
    prompt = seq.tokens[: len(seq.tokens) - seq.script_pos]
    for i in range(len(prompt) - len(word) + 1):
        if tuple(prompt[i : i + len(word)]) == word:
            return model.after_tool
    return model.script


def _script_next(model: StubModel, seq: _Seq) -> int:
    """The scripted token at the sequence's place in its script (EOS past its end)."""
    script = _script_for(model, seq)
    return script[seq.script_pos] if seq.script_pos < len(script) else EOS


@hookimpl
def tokenize(model: StubModel, text: str, add_special: bool, parse_special: bool) -> list[int]:
    model.native_call()
    return _tokenize(model, text, add_special, parse_special)


def _tokenize(model: StubModel, text: str, add_special: bool, parse_special: bool) -> list[int]:
    out = [BOS] if add_special else []
    for n, word in enumerate(text.split()):
        if parse_special and word in SPECIALS:
            out.append(SPECIALS[word])
        else:
            out.extend(_tokenize_word(model, word, first=n == 0 and not out))
    return out


def _piece(token: int) -> bytes:
    if token < BYTE_BASE:
        return b""  # special tokens render as nothing, as llama.cpp's pieces do
    if token < WORD_BASE:
        return bytes([token - BYTE_BASE])
    return b" " + _word(token - WORD_BASE).encode()


@hookimpl
def detokenize(model: StubModel, tokens: Sequence[int]) -> bytes:
    model.native_call()
    for t in tokens:
        if not 0 <= t < model.n_vocab:
            raise InvalidRequest("tokens", f"token id {t} outside the vocabulary")
    return b"".join(_piece(t) for t in tokens)


def _next_token(model: StubModel, seq: _Seq, sampler: _Sampler | None, greedy: bool = False) -> int:
    h = _mix(seq.rolling[-1], model.adapter_mix())
    if sampler is not None and sampler.allowed is not None:
        done = tuple(sampler.generated)
        nexts = sorted(
            {a[len(done)] for a in sampler.allowed if len(a) > len(done) and a[: len(done)] == done}
        )
        if done in sampler.allowed or not nexts:
            return EOS
        return nexts[_mix(h, sampler.params.seed) % len(nexts)]
    if model.eog_every > 0 and _mix(h, 0xE06) % model.eog_every == 0:
        return EOS
    span = model.n_vocab - WORD_BASE
    params = sampler.params if sampler is not None else None
    control = model.control
    if control.fail_at == "sample" and params is not None and params.seed == control.fail_seed:
        raise OverflowError("stub: injected sampler overflow")
    if params is not None and params.logit_bias:
        # A bias of 100 forces its token; -100 bans one (re-picked below).
        forced = [t for t, b in params.logit_bias if b >= 100]
        if forced:
            return forced[0]
    banned = {t for t, b in params.logit_bias if b <= -100} if params is not None else set()
    for attempt in range(64):
        tok = _pick(h if attempt == 0 else _mix(h, attempt), span, params, greedy)
        if tok not in banned:
            return tok
    return EOS


def _pick(h: int, span: int, params: SamplerParams | None, greedy: bool) -> int:
    """The stub's token for context hash ``h``: greedy, or a seeded draw that depends on
    every sampler setting (so each one changes what the stub says)."""
    if params is None or params.temperature == 0 or greedy:
        if params is not None and params.penalized:
            h = _mix(h, _penalty_salt(params))
        return WORD_BASE + h % span
    pool = params.top_k or 64
    salt = _mix(
        params.seed,
        round(params.temperature * 1000),
        round(params.top_p * 1000),
        round(params.min_p * 1000),
        round(params.repetition_penalty * 1000),
    )
    if params.presence_penalty or params.frequency_penalty:
        salt = _mix(salt, _penalty_salt(params))
    pick = _mix(h, salt) % pool
    return WORD_BASE + _mix(h, pick) % span


def _penalty_salt(params: SamplerParams) -> int:
    if not params.penalized:
        return 0
    return _mix(
        round(params.repetition_penalty * 1000),
        round(params.presence_penalty * 1000) & 0xFFFF,
        round(params.frequency_penalty * 1000) & 0xFFFF,
        params.penalty_last_n & 0xFFFFFF,
    )


def _fake_logprobs(
    h: int, token: int, span: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Deterministic stand-ins for log-probabilities: the picked token ranked first, the
    alternatives below it, all <= 0 and most likely first."""
    first = -0.05 - (h % 1000) / 10_000
    alternatives = [(token, first)]
    for i in range(1, top):
        other = WORD_BASE + _mix(h, i) % span
        if all(other != t for t, _ in alternatives):
            alternatives.append((other, first - 0.5 * i))
    return first, tuple(alternatives[:top])


@hookimpl
def step(
    model: StubModel, ops: Sequence[StepOp], on_sampled: Callable[[int, int], None] | None
) -> list[StepResult]:
    model.check_alive()
    control = model.control
    control.steps += 1
    control.history.append(tuple(ops))
    control.active += 1
    try:
        control.step_entered.set()
        if control.gate is not None:
            _park(control, control.gate.wait)
        if control.permits is not None:
            _park(control, control.permits.acquire)
        if control.step_delay_s:
            time.sleep(control.step_delay_s)
        return _step(model, ops, on_sampled)
    finally:
        control.active -= 1


def _park(control: StubControl, wait: Callable[[], object]) -> None:
    control.waiting += 1
    try:
        wait()
    finally:
        control.waiting -= 1


def _step(
    model: StubModel, ops: Sequence[StepOp], on_sampled: Callable[[int, int], None] | None
) -> list[StepResult]:
    control = model.control
    if control.fail_at == "step" and (
        control.fail_step is None or control.fail_step == control.steps
    ):
        raise RuntimeError(f"stub: injected failure at step {control.steps}")
    if len({op.seq for op in ops}) != len(ops):
        raise ValueError("more than one op for a sequence in one step")
    results: list[StepResult] = []
    for op in ops:
        seq = model.seq(op.seq)
        if isinstance(op, Prefill):
            if len(seq.tokens) + len(op.tokens) > model.n_ctx:
                raise ValueError("context overflow")
            for t in op.tokens:
                if not 0 <= t < model.n_vocab:
                    raise ValueError(f"token id {t} outside the vocabulary")
                seq.append(t)
            seq.has_logits = op.logits
            results.append(Prefilled(seq=op.seq, n_tokens=len(op.tokens)))
        elif isinstance(op, Decode):
            if not seq.has_logits:
                raise RuntimeError(f"decode on sequence {op.seq} without logits")
            if len(seq.tokens) >= model.n_ctx:
                raise ValueError("context overflow")
            sampler = op.sampler if isinstance(op.sampler, _Sampler) else None
            try:
                if model.script is not None:
                    tok = _script_next(model, seq)
                    seq.script_pos += 1
                else:
                    tok = _next_token(model, seq, sampler, greedy=op.greedy)
            except (ArithmeticError, ValueError) as exc:
                # Sampling touches no KV: only this request fails.
                results.append(SeqFailed(seq=op.seq, error=exc))
                continue
            if on_sampled is not None:
                on_sampled(op.seq, tok)
            if control.forward_gate is not None:
                _park(control, control.forward_gate.wait)
            if sampler is not None:
                sampler.generated.append(tok)
            if op.logprobs is None:
                result = Sampled(seq=op.seq, token=tok, eog=tok == EOS)
            else:
                lp, top = _fake_logprobs(
                    _mix(seq.rolling[-1], 0x106), tok, model.n_vocab - WORD_BASE, op.logprobs
                )
                result = Sampled(
                    seq=op.seq, token=tok, eog=tok == EOS, logprob=lp, top_logprobs=top
                )
            seq.append(tok)
            if op.draft is not None and tok != EOS:
                result = _verify(model, seq, sampler, op.draft(tok), result, op.greedy)
            results.append(result)
        else:
            raise TypeError(f"unknown op {op!r}")
    return results


def _verify(
    model: StubModel,
    seq: _Seq,
    sampler: _Sampler | None,
    draft: Sequence[int],
    sampled: Sampled,
    greedy: bool,
) -> Sampled:
    """Accept the draft's tokens while each is what the stub would decode next, greedily
    or by the request's draw (``greedy``: the step's mode). The stub's draw is a function
    of the context and the seed, so the first token that does not match is what the next
    step decodes anyway: exactly plain decoding."""
    accepted: list[int] = []
    for want in draft:
        if len(seq.tokens) >= model.n_ctx:
            break
        if model.script is not None:
            tok = _script_next(model, seq)
        else:
            tok = _next_token(model, seq, sampler, greedy=greedy)
        if tok != want:
            break
        if model.script is not None:
            seq.script_pos += 1
        if sampler is not None:
            sampler.generated.append(tok)
        seq.append(tok)
        accepted.append(tok)
        if tok == EOS:
            break
    return attrs.evolve(sampled, accepted=tuple(accepted), drafted=len(draft))


@hookimpl
def kv_pack(model: StubModel, seq: int) -> bytes:
    model.check_alive()
    model.fail("pack")
    control = model.control
    if control.pack_gate is not None:
        _park(control, control.pack_gate.wait)
    tokens = model.seq(seq).tokens
    body = struct.pack(f"<{len(tokens)}I", *tokens)
    digest = hashlib.blake2b(body, digest_size=8).digest()
    return _STATE_MAGIC + struct.pack("<I", len(tokens)) + digest + body


@hookimpl
def kv_unpack(model: StubModel, seq: int, data: bytes | bytearray | memoryview) -> None:
    model.check_alive()
    model.fail("unpack")
    data = bytes(data)  # the stub's states are small; a copy keeps the parsing simple
    head = len(_STATE_MAGIC) + 12
    if len(data) < head or not data.startswith(_STATE_MAGIC):
        raise ValueError("not a stub KV state")
    (n,) = struct.unpack_from("<I", data, len(_STATE_MAGIC))
    body = data[head:]
    if len(body) != 4 * n or hashlib.blake2b(body, digest_size=8).digest() != data[head - 8 : head]:
        raise ValueError("stub KV state is damaged")
    if n > model.n_ctx:
        raise ValueError("state longer than the context")
    s = _Seq()
    for t in struct.unpack(f"<{n}I", body):
        s.append(t)
    s.script_pos = 0
    model.seq(seq)  # range check
    model.seqs[seq] = s


@hookimpl
def seq_rm(model: StubModel, seq: int, start: int, end: int | None) -> None:
    model.fail("seq_rm")
    s = model.seq(seq)
    if end is not None and end < len(s.tokens):
        raise ValueError("the stub only removes a sequence's tail")
    s.truncate(start)
    s.has_logits = False


@hookimpl
def apply_chat_template(
    model: StubModel,
    messages: Sequence[ChatMessage],
    system: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    verbatim: Sequence[tuple[str, Sequence[int]]],
) -> list[int]:
    model.native_call()
    parts = []
    if system or tools:
        text = system or ""
        if tools:
            text += " tools: " + " ".join(
                f"{t.get('name', '')} {t.get('description', '')}" for t in tools
            )
        parts.append(f"system: {text}")
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequest("messages", "each message needs string 'role' and 'content'")
        parts.append(f"{role}: {content} </s>")
    if add_generation_prompt:
        parts.append("assistant:")
    tokens = [BOS]
    for part in split_verbatim(" ".join(parts), verbatim):
        if isinstance(part, str):
            tokens += _tokenize(model, part, add_special=False, parse_special=True)
        else:
            tokens += part
    return tokens


@hookimpl
def embed(model: StubModel, tokens: Sequence[int]) -> list[float]:
    model.check_alive()
    vec = [0.0] * model.embed_dim
    for pos, t in enumerate(tokens):
        for i in range(model.embed_dim):
            vec[i] += ((_mix(t, i, pos) & 0xFFFF) / 32768.0) - 1.0
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [v / norm for v in vec]


@hookimpl
def sampler_new(model: StubModel, params: SamplerParams) -> _Sampler:
    model.native_call()
    allowed = None
    if params.grammar is not None:
        try:
            strings = expand(parse_gbnf(params.grammar))
        except ValueError as exc:
            raise InvalidRequest("grammar", str(exc)) from exc
        allowed = [
            tuple(_tokenize(model, s, add_special=False, parse_special=False)) for s in strings
        ]
    return _Sampler(params=params, allowed=allowed)


@hookimpl
def sampler_free(model: StubModel, sampler: _Sampler) -> None:
    sampler.generated.clear()


@hookimpl
def adapter_load(model: StubModel, path: str) -> int:
    model.check_alive()
    data = Path(path).read_bytes()
    if not data.startswith(b"STUBLORA"):
        raise ValueError(f"{path} is not a stub adapter (expected the STUBLORA magic)")
    handle = model.next_adapter
    model.next_adapter += 1
    model.adapters[handle] = hashlib.sha256(data).digest()
    return handle


@hookimpl
def adapter_free(model: StubModel, adapter: int) -> None:
    model.adapters.pop(adapter, None)
    model.active = tuple(a for a in model.active if a[0] != adapter)


@hookimpl
def adapters_apply(model: StubModel, adapters: Sequence[tuple[int, float]]) -> None:
    for handle, _ in adapters:
        if handle not in model.adapters:
            raise ValueError(f"unknown adapter handle {handle}")
    model.active = tuple(adapters)


@hookimpl
def metadata(model: StubModel) -> dict[str, str]:
    return {"architecture": "stub", "n_vocab": str(model.n_vocab), "n_ctx": str(model.n_ctx)}
