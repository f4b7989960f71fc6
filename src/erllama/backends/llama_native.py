"""llama.cpp through llama-cpp-python's low-level ``llama_cpp`` bindings.

One :class:`LlamaModel` holds a model, its generation context (``n_seq_max`` sequences),
one reusable batch, per-sequence positions and logits rows, and, lazily, a separate
embeddings context so ``embed`` never touches a generation sequence's KV.

Safety rules (a GGML assert aborts the whole process, so inputs are checked first):
every call happens on the model's worker thread, one at a time; token ids are checked
against the vocabulary and positions against the per-sequence context before decoding;
a decode that asks for logits that do not exist is refused instead of reading garbage.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import llama_cpp as L
import numpy as np

from ..config import DEFAULT_TOOL_CALL_MARKERS, MAX_DRAFT, ModelConfig
from ..errors import ConfigError, InvalidRequest
from ..sampling import SamplerParams
from .llama_compute import COMPUTE_MODES, shared_compute
from .llama_sampling import Sampler, new_sampler
from .types import Decode, Prefill, Prefilled, Sampled, SeqFailed, StepOp, StepResult

log = logging.getLogger("erllama.llama_cpp")

GGML_TYPES = {
    "f32": L.GGML_TYPE_F32,
    "f16": L.GGML_TYPE_F16,
    "bf16": 30,  # GGML_TYPE_BF16; not exported by the bindings
    "q8_0": L.GGML_TYPE_Q8_0,
    "q4_0": L.GGML_TYPE_Q4_0,
    "q4_1": L.GGML_TYPE_Q4_1,
    "iq4_nl": L.GGML_TYPE_IQ4_NL,
    "q5_0": L.GGML_TYPE_Q5_0,
    "q5_1": L.GGML_TYPE_Q5_1,
}

#: general.file_type -> quantisation label (llama.h's llama_ftype).
FTYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
    11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
    17: "q5_k_m", 18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 22: "iq3_xs", 23: "iq3_xxs",
    24: "iq1_s", 25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m",
    30: "iq4_xs", 31: "iq1_m", 32: "bf16",
}  # fmt: skip

# Options the backend itself reads; every other key must name a llama.cpp parameter.
OWN_OPTIONS = frozenset(
    {
        "progress_callback",
        "embedding_n_ctx",
        "pooling",
        "grammar_step_limit_s",
        "compute_thread",
        "pad_prefill",
    }
)
#: ``options["pad_prefill"]``: a prompt chunk shorter than this is padded to it. On the CPU
#: with flash attention, llama.cpp computes a sequence's rows with its tiled attention
#: kernel from 64 rows of that sequence in a micro-batch, and then each row exactly as in
#: any other such micro-batch, whatever the other rows hold, where the chunk starts, or
#: how many sequences share the call (research/exactness/exp6_padding.py and
#: exp6b_batched.py: 16 of 16 and 12 of 12 prompts bit for bit). A shorter chunk takes the
#: per-row kernel, whose cells differ in the last bits.
PAD_ROWS = 64
#: llama.cpp's tokenizer splits text at each special token's text in time quadratic in
#: their number (measured on SmolLM2: 10,000 take 4 s, 40,000 take 20 s; a 4 MiB body
#: could hold 350,000), inside one native call that nothing interrupts. So a rendered chat
#: prompt is tokenized in pieces of at most this many, cut just before one (where
#: llama.cpp cuts too: the tokens are the same), with a cancellation point between pieces
#: (linear then: 20,000 take 2 s).
SPECIALS_PER_PIECE = 64
#: Special-token texts one rendered chat prompt may hold at most (a chat turn has two or
#: three).
MAX_SPECIAL_TOKENS = 16384
#: Characters a chat template may render (far beyond any context; a template that loops
#: over its input must not fill memory).
MAX_RENDERED_CHARS = 64 * 1024 * 1024
#: A request whose grammar makes one sampling step take longer than this fails (its
#: model serves on). The step cannot be interrupted (one native call): this bounds how
#: long a costly grammar holds the model per token, once it shows; ``grammar_cost``
#: refuses the grammars known to be costly before they run.
GRAMMAR_STEP_LIMIT_S = 2.0

_init_lock = threading.Lock()
_initialised = False
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


@L.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, _user: Any) -> None:
    # llama.cpp logs a lot at load; route it to logging instead of stderr. Its warnings and
    # errors are kept at DEBUG too, because erllama reports failures itself, typed.
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip())


def ensure_backend() -> None:
    """Initialise llama.cpp once per process, on first model load (not at import)."""
    global _initialised
    with _init_lock:
        if not _initialised:
            L.llama_log_set(_log_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
            _initialised = True


def _usable_cores() -> int:
    """Logical cores this process may run on (its affinity mask, as a container limits
    it), not every core of the host."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _meta(model: Any, key: str) -> str | None:
    size = 1 << 16 if key == "tokenizer.chat_template" else 512
    while True:
        buf = ctypes.create_string_buffer(size)
        n = L.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


_INT_TYPES = (
    ctypes.c_int, ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64,
    ctypes.c_uint, ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64,
)  # fmt: skip
_FLOAT_TYPES = (ctypes.c_float, ctypes.c_double)


def _coerce(key: str, ctype: Any, value: Any) -> Any:
    """``value`` checked against the C type of the field it sets (a wrong type would be
    silently truncated by ctypes, or raise deep inside the load)."""
    if ctype is ctypes.c_bool:
        if isinstance(value, bool):
            return value
        raise ConfigError([(f"options.{key}", f"must be a bool, got {value!r}")])
    if ctype in _INT_TYPES:
        if isinstance(value, int) and not isinstance(value, bool):
            bits = ctypes.sizeof(ctype) * 8
            signed = ctype(-1).value == -1
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            if lo <= value <= hi:
                return value
            raise ConfigError([(f"options.{key}", f"must be in [{lo}, {hi}], got {value}")])
        raise ConfigError([(f"options.{key}", f"must be an integer, got {value!r}")])
    if ctype in _FLOAT_TYPES:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError([(f"options.{key}", f"must be a number, got {value!r}")])
    raise ConfigError(
        [(f"options.{key}", "is a pointer or structure field; it cannot be set from options")]
    )


def _set_fields(struct: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Apply pass-through options that name fields of ``struct``; return those applied."""
    types = {f[0]: f[1] for f in struct._fields_}
    applied = {}
    problems: list[tuple[str, str]] = []
    for key, value in options.items():
        if key in types and key not in OWN_OPTIONS:
            try:
                value = _coerce(key, types[key], value)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            setattr(struct, key, value)
            applied[key] = value
    if problems:
        raise ConfigError(problems)
    return applied


def _special_texts(vocab: Any, n_vocab: int) -> tuple[re.Pattern[str] | None, frozenset[str]]:
    """A regex of every token text llama.cpp's tokenizer parses as special (control,
    user-defined, unknown; None when there are none), and those of them that strip the
    whitespace before them (a prompt is never cut just before one of those)."""
    wanted = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
    wanted |= L.LLAMA_TOKEN_ATTR_UNKNOWN
    texts: set[str] = set()
    lstrip: set[str] = set()
    for t in range(n_vocab):
        attr = int(L.llama_vocab_get_attr(vocab, t))
        if attr & wanted:
            raw = L.llama_vocab_get_text(vocab, t)
            text = raw.decode("utf-8", errors="replace") if raw else ""
            if text:
                texts.add(text)
                if attr & L.LLAMA_TOKEN_ATTR_LSTRIP:
                    lstrip.add(text)
    if not texts:
        return None, frozenset()
    longest_first = sorted(texts, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in longest_first)), frozenset(lstrip)


class LlamaModel:
    """A loaded GGUF and its contexts. Not thread-safe: the engine serialises calls."""

    def __init__(self, config: ModelConfig) -> None:
        ensure_backend()
        path = config.model_path
        if path is None:
            raise ValueError("backend 'llama_cpp' needs ModelConfig.model_path")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        with Path(path).open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (bad magic)")
        options = dict(config.options)
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if config.use_mmap else L.LLAMA_LOAD_MODE_NONE
        progress = options.get("progress_callback")
        self._progress_cb = None
        if progress is not None:
            # Keep the ctypes callback alive for as long as llama.cpp may call it.
            self._progress_cb = L.llama_progress_callback(lambda p, _u: bool(progress(p)) or True)
            mparams.progress_callback = self._progress_cb
        model_applied = _set_fields(mparams, options)
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path} (malformed or truncated GGUF?)")
        self.ctx: Any = None
        self.embed_ctx: Any = None
        self._adapters_applied: list[tuple[Any, float]] = []
        try:
            self._init_context(config, options, model_applied)
        except BaseException:
            self.free()
            raise

    def _init_context(
        self, config: ModelConfig, options: dict[str, Any], model_applied: Mapping[str, Any]
    ) -> None:
        self.vocab = L.llama_model_get_vocab(self.model)
        self._tls = threading.local()
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        if self.n_vocab <= 0:
            raise ValueError("model has an empty vocabulary")
        cparams = L.llama_context_default_params()
        # ModelConfig.n_ctx is per sequence. Each sequence gets its own KV cells
        # (kv_unified off): measured on CPU, 4 sequences decode 1.35-1.4x faster per step
        # that way than in one shared pool, and a sequence can never be starved of cells.
        cparams.n_ctx = config.n_ctx * config.n_seq_max
        cparams.kv_unified = False
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_ubatch or min(config.n_batch, 512)
        cparams.n_seq_max = config.n_seq_max
        cores = _usable_cores()
        # Measured (erllama bench --only threads, 2-core VM): decoding one token is memory
        # bound, equal on 1 and 2 threads idle, and on a loaded machine all-core decoding
        # collapsed (38 vs 129 tok/s: llama.cpp's threads meet at a barrier after every op,
        # and one that loses its core stalls the rest); prefilling is compute bound, 1.8x
        # faster on both cores idle. So: half the cores to decode, all of them to prefill
        # (llama-cpp-python's defaults too).
        cparams.n_threads = config.n_threads or max(1, cores // 2)
        cparams.n_threads_batch = config.n_threads_batch or config.n_threads or cores
        cparams.type_k = GGML_TYPES[config.type_k]
        cparams.type_v = GGML_TYPES[config.type_v]
        # Speculative decoding verifies a draft in one multi-token pass, which must compute
        # each token bit for bit as a one-token pass does. Measured on this CPU build
        # (research/speculative/verify_invariance.py): so it does with flash attention on
        # and one decode thread (per-row kernels either way, below 64 tokens); without
        # flash attention 89 of 96 positions differed, with two decode threads past 256
        # cells every one (the one-token pass splits the cells across threads). ModelConfig
        # refuses the other settings with speculative; unset, these are the defaults.
        flash = config.flash_attn
        if config.speculative is not None:
            flash = True
            cparams.n_threads = 1
        #: Rows a prompt chunk is padded to (0: not padded; see PAD_ROWS).
        self.pad_rows = self._pad_rows(config, options)
        if self.pad_rows:
            flash = True
        cparams.flash_attn_type = {
            None: L.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash]
        cparams.embeddings = False
        cparams.no_perf = True
        ctx_applied = _set_fields(cparams, options)
        unknown = set(options) - set(ctx_applied) - set(model_applied) - OWN_OPTIONS
        if unknown:
            raise ConfigError(
                [
                    (f"options.{k}", "not a llama.cpp model or context parameter")
                    for k in sorted(unknown)
                ]
            )
        self.cparams = cparams
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ValueError("llama.cpp could not create a context (out of memory?)")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_seq = config.n_seq_max
        self.n_batch = int(L.llama_n_batch(self.ctx))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(self.ctx))
        self.batch = L.llama_batch_init(self.n_batch, 0, self.n_seq)
        self._batch_alive = True
        self.pos = dict.fromkeys(range(self.n_seq), 0)
        # Batch row holding each sequence's latest logits; -1 once they are gone.
        self.logits_row = dict.fromkeys(range(self.n_seq), -1)
        #: Logits copied out of the context for a sequence whose last call was not the
        #: step's last (see ``step``); sampled from once, then dropped.
        self._saved: dict[int, np.ndarray[Any, Any]] = {}
        #: Per sequence: the token a verify drew where the draft did not match, with the
        #: sampler that drew it (already accounted there). It is the sequence's next token:
        #: drawing that place again would draw it twice, which changes the distribution.
        self._pending: dict[int, tuple[Sampler, int]] = {}
        self.greedy = L.llama_sampler_init_greedy()
        self.embedding_n_ctx = int(options.get("embedding_n_ctx", min(config.n_ctx, 2048)))
        self.pooling = options.get("pooling", "mean")
        limit = options.get("grammar_step_limit_s", GRAMMAR_STEP_LIMIT_S)
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
            raise ConfigError(
                [("options.grammar_step_limit_s", f"must be a number > 0, got {limit!r}")]
            )
        self.grammar_step_limit_s = float(limit)
        mode = options.get("compute_thread", "shared")
        if mode not in COMPUTE_MODES:
            raise ConfigError(
                [("options.compute_thread", f"must be one of {COMPUTE_MODES}, got {mode!r}")]
            )
        #: Runs a graph computation: on the process's compute thread (llama_compute.py).
        self.compute: Callable[[Callable[[], Any]], Any] = (
            shared_compute().run if mode == "shared" else _call
        )
        self.quant = FTYPES.get(int(_meta(self.model, "general.file_type") or -1), "unknown")
        self.chat_template = _meta(self.model, "tokenizer.chat_template")
        # The call syntax a template without tool support is told (the markers the engine
        # then matches: the config's, else Hermes', erllama.model.spans.markers_for).
        markers = config.tool_call_markers or DEFAULT_TOOL_CALL_MARKERS
        self.tool_call_markers = (markers.start, markers.end)
        self.kv_layout = {
            "backend": "llama_cpp",
            "version": L.__version__,
            "n_ctx_seq": self.n_ctx_seq,
            # A sequence's state is laid out per KV stream: llama.cpp refuses a state saved
            # under another sequence count ("wrong model or layout"), so rows are keyed by
            # it and two configs sharing a cache directory never destroy each other's rows.
            "n_seq_max": self.n_seq,
            "kv_unified": False,
            "type_k": config.type_k,
            "type_v": config.type_v,
            "flash_attn": flash,
            # Pass-through context options (rope scaling ...) shape the KV values too.
            **{f"opt.{k}": v for k, v in sorted(ctx_applied.items())},
        }
        self.eog = frozenset(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t))
        self.specials, self.lstrip = _special_texts(self.vocab, self.n_vocab)
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, 256)
        self.metadata = {
            "architecture": _meta(self.model, "general.architecture") or "unknown",
            "name": _meta(self.model, "general.name") or "",
            "description": desc.value.decode(errors="replace"),
            "n_params": str(L.llama_model_n_params(self.model)),
            "n_embd": str(L.llama_model_n_embd(self.model)),
            "n_layer": str(L.llama_model_n_layer(self.model)),
            "n_ctx_train": str(L.llama_model_n_ctx_train(self.model)),
            "quant": self.quant,
            "has_chat_template": str(self.chat_template is not None).lower(),
        }

    @staticmethod
    def _pad_rows(config: ModelConfig, options: Mapping[str, Any]) -> int:
        """``options["pad_prefill"]``: true pads (and refuses settings it is not measured
        exact with), false keeps the 64-token grid, unset pads wherever it is exact: on
        the CPU with flash attention on or automatic, micro-batches of 64 rows or more."""
        pad = options.get("pad_prefill")
        if pad is not None and not isinstance(pad, bool):
            raise ConfigError([("options.pad_prefill", f"must be true or false, got {pad!r}")])
        ubatch = int(options.get("n_ubatch") or config.n_ubatch or config.n_batch)
        problems = {
            "needs flash attention (its row-exact kernel)": config.flash_attn is False,
            "measured exact on the CPU only: n_gpu_layers must be 0": config.n_gpu_layers != 0,
            f"needs n_batch >= {PAD_ROWS}": config.n_batch < PAD_ROWS,
            f"needs n_ubatch >= {PAD_ROWS}": ubatch < PAD_ROWS,
        }
        if pad is None:
            return 0 if any(problems.values()) else PAD_ROWS
        if not pad:
            return 0
        refused = [("options.pad_prefill", why) for why, bad in problems.items() if bad]
        if refused:
            raise ConfigError(refused[:1])
        return PAD_ROWS

    def free(self) -> None:
        # Order matters: contexts before the model (which also frees its adapters).
        if getattr(self, "_batch_alive", False):
            L.llama_batch_free(self.batch)
            self._batch_alive = False
        if getattr(self, "greedy", None):
            L.llama_sampler_free(self.greedy)
            self.greedy = None
        for name in ("embed_ctx", "ctx"):
            ctx = getattr(self, name, None)
            if ctx:
                L.llama_free(ctx)
                setattr(self, name, None)
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    # ---- text -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        while True:
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        # One buffer per thread, reused (pieces are short; a longer one grows it for good).
        # Per thread: detokenize may run on worker threads beside the model thread.
        tls = self._tls
        buf = getattr(tls, "buf", None)
        if buf is None:
            buf = tls.buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = tls.buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        self._check_tokens(tokens, "tokens")
        # Concatenated pieces, so streaming token by token yields exactly these bytes.
        return b"".join(self.piece(t, special) for t in tokens)

    def _check_tokens(self, tokens: Sequence[int], param: str) -> None:
        n = self.n_vocab
        for t in tokens:
            if not 0 <= t < n:
                raise InvalidRequest(param, f"token id {t} outside the vocabulary (0..{n - 1})")

    def chat_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        verbatim: Sequence[tuple[str, Sequence[int]]] = (),
    ) -> list[int]:
        from .llama_chat import cancel_point, render_chat_template, split_verbatim

        if self.chat_template is None:
            raise InvalidRequest("messages", "the model's GGUF has no tokenizer.chat_template")
        bos = self.piece_text(L.llama_vocab_bos(self.vocab))
        eos = self.piece_text(L.llama_vocab_eos(self.vocab))
        try:
            text = render_chat_template(
                self.chat_template, messages, system=system, tools=tools,
                add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                max_chars=MAX_RENDERED_CHARS, tool_call_markers=self.tool_call_markers,
            )  # fmt: skip
        except ValueError as exc:
            raise InvalidRequest("messages", str(exc)) from exc
        tokens: list[int] = []
        for part in split_verbatim(text, verbatim):
            if isinstance(part, str):
                for piece in self._chat_pieces(part):
                    cancel_point()
                    tokens += self.tokenize(piece, add_special=False, parse_special=True)
            else:
                self._check_tokens(part, "verbatim")
                tokens += part
        bos_id = int(L.llama_vocab_bos(self.vocab))
        wants_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        if wants_bos and bos_id >= 0 and (not tokens or tokens[0] != bos_id):
            tokens.insert(0, bos_id)
        return tokens

    def _chat_pieces(self, text: str) -> list[str]:
        """``text`` cut just before every ``SPECIALS_PER_PIECE``-th special token (see
        there); InvalidRequest past ``MAX_SPECIAL_TOKENS``."""
        if self.specials is None:
            return [text]
        cuts = [0]
        for n, m in enumerate(self.specials.finditer(text), 1):
            if n > MAX_SPECIAL_TOKENS:
                raise InvalidRequest(
                    "messages",
                    f"render to more than {MAX_SPECIAL_TOKENS} special tokens (the chat "
                    "template's markers, or their text inside messages)",
                )
            at = m.start()
            if n % SPECIALS_PER_PIECE == 0 and at > cuts[-1] and m.group() not in self.lstrip:
                cuts.append(at)
        cuts.append(len(text))
        return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]

    def piece_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # ---- decoding ---------------------------------------------------------------------------

    def step(
        self, ops: Sequence[StepOp], on_sampled: Callable[[int, int], None] | None = None
    ) -> list[StepResult]:
        """Sample every decoder from the logits its sequence got last, then run the step's
        forward passes: each prefill chunk in a ``llama_decode`` of its own (padded chunks of
        several sequences together: ``_chunk_calls``), then every sampled token together in
        one last call.

        Chunks go alone because llama.cpp cuts a call mixing sequences into micro-batches
        of equal token counts (``split_equal``), so a chunk sharing a call with another
        sequence's decode row would be computed as 1 + 63 tokens instead of 64, with other
        kernels: the engine's chunk grid (``Scheduler.schedule``) relies on a chunk being
        computed the same way whatever else runs. The decode call goes last so that the
        decoders' logits are the context's own for the next step; a prompt's last chunk
        that gets logits before another call of the step has them copied out
        (``_saved``), and its first token is sampled from the copy."""
        results: list[StepResult] = []
        decode_rows: list[tuple[int, Sequence[int], int]] = []
        drafts: list[tuple[int, Decode, Sampled, list[int]]] = []
        for op in ops:
            if isinstance(op, Decode):
                result = self._sample(op)
                if not isinstance(result, Sampled):
                    results.append(result)
                    continue
                if on_sampled is not None:
                    on_sampled(op.seq, result.token)  # streamed now, a pass earlier
                draft = self._draft(op, result) if op.draft is not None else []
                if draft:
                    drafts.append((len(results), op, result, draft))
                    decode_rows.append((op.seq, (result.token, *draft), 1 + len(draft)))
                else:
                    decode_rows.append((op.seq, (result.token,), 1))
                results.append(result)
        chunks = [op for op in ops if isinstance(op, Prefill)]
        for op in chunks:
            self._check_tokens(op.tokens, "prompt")
            self._pending.pop(op.seq, None)  # a new prompt: an old draw is not its token
        calls = self._chunk_calls(chunks)
        for i, call in enumerate(calls):
            self._decode(
                [(op.seq, op.tokens, 1 if op.logits else 0) for op, _ in call],
                pad={op.seq: pad for op, pad in call},
            )
            for op, _ in call:
                results.append(Prefilled(seq=op.seq, n_tokens=len(op.tokens)))
                if op.logits and (decode_rows or i < len(calls) - 1):
                    self._save_logits(op.seq)
        # Every token handed back is in the KV when this returns.
        first = self._decode(decode_rows)
        for at, op, sampled, draft in drafts:
            results[at] = self._verify(op, sampled, draft, first[op.seq])
        return results

    def _draft(self, op: Decode, sampled: Sampled) -> list[int]:
        """The draft to verify after ``sampled`` (none after an end of generation), cut to
        what the sequence's context and the batch can take and at its first token outside
        the vocabulary (a drafter's mistake costs its draft, never the model)."""
        assert op.draft is not None
        if sampled.eog:
            return []
        room = min(self.n_ctx_seq - self.pos[op.seq] - 1, self.n_batch - 1, MAX_DRAFT)
        draft: list[int] = []
        for t in op.draft(sampled.token):
            if len(draft) >= room or not isinstance(t, int) or not 0 <= t < self.n_vocab:
                break
            draft.append(t)
        return draft

    def _verify(
        self, op: Decode, sampled: Sampled, draft: list[int], first: int
    ) -> Sampled | SeqFailed:
        """Accept the longest prefix of ``draft`` that plain decoding would produce from the
        logits the forward pass gave each place (row ``first + j`` holds the logits after
        the sampled token and ``j`` draft tokens); drop the rest's cells.

        Greedy requests: a token is accepted where it is the greedy choice. A request that
        draws draws each place once, as plain decoding would (the same chain, from the
        same logits, in order): a matching draw accepts the drafted token, and the first
        draw that does not match is the next token (``_pending``). That is speculative
        sampling's rejection rule for a draft given as tokens: the drafted token is kept
        with its probability under the request's sampler, and otherwise the next token
        follows that distribution without it."""
        seq = op.seq
        sampler = op.sampler if isinstance(op.sampler, Sampler) else None
        draws = sampler is not None and sampler.greedy_ptr is not None and op.logprobs is None
        accepted: list[int] = []
        drawn: int | None = None
        for j, want in enumerate(draft):
            if sampler is None:
                tok = int(L.llama_sampler_sample(self.greedy, self.ctx, first + j))
            elif draws:
                t0 = time.perf_counter()
                tok = sampler.sample(self.ctx, first + j, op.greedy)  # accounted
                failed = self._over_grammar_limit(seq, sampler, time.perf_counter() - t0)
                if failed is not None:
                    # As in _sample, the request fails (a verify must not be a way round
                    # the grammar's limit), and its KV is as before the step: the sampled
                    # token's cell and the draft's go.
                    self.seq_rm(seq, self.pos[seq] - 1 - len(draft), None)
                    return failed
            else:
                tok = sampler.choose(self._row_logits(first + j))
            if tok != want:
                if draws and 0 <= tok < self.n_vocab:
                    drawn = tok
                break
            if sampler is not None and not draws:
                sampler.accept(tok)
            accepted.append(tok)
            if tok in self.eog:
                break
        if len(accepted) < len(draft):
            self.seq_rm(seq, self.pos[seq] - len(draft) + len(accepted), None)
        # (seq_rm forgets the sequence's logits; the forward pass left them in this row.)
        self.logits_row[seq] = first + len(accepted)
        if drawn is not None and sampler is not None:
            self._pending[seq] = (sampler, drawn)
        return attrs.evolve(sampled, accepted=tuple(accepted), drafted=len(draft))

    def _sample(self, op: Decode) -> Sampled | SeqFailed:
        pending = self._pending.pop(op.seq, None)
        if pending is not None and pending[0] is op.sampler and op.logprobs is None:
            tok = pending[1]  # drawn by the last verify (see _verify)
            return Sampled(seq=op.seq, token=tok, eog=tok in self.eog)
        saved = self._saved.pop(op.seq, None)
        row = self.logits_row.get(op.seq, -1)
        if saved is None and row < 0:
            raise RuntimeError(f"sequence {op.seq} has no logits to sample from")
        if isinstance(op.sampler, Sampler):
            t0 = time.perf_counter()
            if saved is None:
                tok = op.sampler.sample(self.ctx, row, op.greedy)
            else:
                tok = op.sampler.sample_logits(saved, op.greedy)
            # Sampling touched no KV: only this request fails, typed, naming its grammar
            # (the server answers a 400).
            failed = self._over_grammar_limit(op.seq, op.sampler, time.perf_counter() - t0)
            if failed is not None:
                return failed
        elif saved is None:
            tok = int(L.llama_sampler_sample(self.greedy, self.ctx, row))
        else:
            tok = int(saved.argmax())
        if not 0 <= tok < self.n_vocab:
            # Sampling touched no KV: only this request fails (a grammar with no allowed
            # token left, say).
            err = RuntimeError(f"the sampler returned no valid token ({tok})")
            return SeqFailed(seq=op.seq, error=err)
        if op.logprobs is None:
            return Sampled(seq=op.seq, token=tok, eog=tok in self.eog)
        logits = saved if saved is not None else self._row_logits(row)
        lp, top = _logprobs(logits, tok, op.logprobs)
        return Sampled(seq=op.seq, token=tok, eog=tok in self.eog, logprob=lp, top_logprobs=top)

    def _over_grammar_limit(self, seq: int, sampler: Sampler, took: float) -> SeqFailed | None:
        """The failure of a request whose grammar made one sampling take ``took`` s, past
        the model's limit; None within it (or without a grammar)."""
        if took <= self.grammar_step_limit_s or not sampler.has_grammar:
            return None
        return SeqFailed(
            seq=seq,
            error=InvalidRequest(
                "grammar",
                f"is too costly to run: one token took {took:.2f} s to sample "
                f"(limit {self.grammar_step_limit_s:g} s)",
            ),
        )

    def _row_logits(self, row: int) -> np.ndarray[Any, Any]:
        """The logits of batch ``row`` of the last call (a view into llama.cpp's buffer)."""
        ptr = L.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _save_logits(self, seq: int) -> None:
        """Copy ``seq``'s logits out of the context before another call replaces them."""
        self._saved[seq] = self._row_logits(self.logits_row[seq]).copy()
        self.logits_row[seq] = -1

    def _chunk_calls(self, chunks: Sequence[Prefill]) -> list[list[tuple[Prefill, int]]]:
        """The ``llama_decode`` calls of a step's prefill chunks, each chunk with its filler
        rows (``_pad_for``): each chunk alone (a call mixing sequences is cut into
        micro-batches of equal size, which would change a chunk's kernel), except padded
        chunks of exactly ``pad_rows`` rows each, which go together as long as the call
        stays one micro-batch: every sequence then has its ``pad_rows`` rows in it, and each
        row is computed as alone (research/exactness/exp6b_batched.py)."""
        if not self.pad_rows:
            return [[(op, 0)] for op in chunks]
        room = min(self.n_batch, int(self.cparams.n_ubatch)) // self.pad_rows
        calls: list[list[tuple[Prefill, int]]] = []
        together: list[tuple[Prefill, int]] = []
        for op in chunks:
            pad = self._pad_for(op)
            if len(op.tokens) + pad != self.pad_rows:
                calls.append([(op, pad)])
                continue
            if len(together) == room:
                calls.append(together)
                together = []
            together.append((op, pad))
        if together:
            calls.append(together)
        return calls

    def _pad_for(self, op: Prefill) -> int:
        """Filler rows to append to ``op``'s chunk: up to ``pad_rows`` rows, where the
        sequence's context has room for them (the engine keeps no cell fed without them)."""
        short = self.pad_rows - len(op.tokens)
        if short <= 0 or self.pos[op.seq] + self.pad_rows > self.n_ctx_seq:
            return 0
        return short

    def _decode(
        self, rows: Sequence[tuple[int, Sequence[int], int]], pad: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """One ``llama_decode`` of ``rows``: (sequence, tokens, how many of its last tokens
        get logits). Returns the batch row of each sequence's first logits row; its
        latest logits are its last row's.

        ``pad``: per sequence, that many filler rows follow its tokens, at the next
        positions and without logits, and their cells are removed after the call; they make
        the micro-batch big enough for the kernel that computes every row exactly
        (``PAD_ROWS``). A filler's value changes no other row (causal attention)."""
        fill = pad or {}
        # In sequence order: with per-sequence KV, llama.cpp splits a batch whose rows are
        # out of sequence order into one micro-batch per sequence, one graph run each
        # (measured: 4 decode rows took 25.6 ms out of order, 19.5 ms in order).
        rows = sorted(rows, key=lambda r: r[0])
        total = sum(len(toks) for _, toks, _ in rows)
        if total == 0:
            return {}
        total += sum(fill.values())
        if total > self.n_batch:
            raise ValueError(f"batch of {total} tokens exceeds n_batch={self.n_batch}")
        seen = set()
        for seq, toks, _ in rows:
            if not 0 <= seq < self.n_seq or seq in seen:
                raise ValueError(f"bad or repeated sequence id {seq}")
            seen.add(seq)
            if self.pos[seq] + len(toks) + fill.get(seq, 0) > self.n_ctx_seq:
                raise ValueError(f"sequence {seq} would exceed its {self.n_ctx_seq}-cell context")
        b = self.batch
        i = 0
        new_rows: dict[int, int] = {}
        first_rows: dict[int, int] = {}
        for seq, toks, want in rows:
            p = self.pos[seq]
            from_j = len(toks) - want
            for j, t in enumerate(toks):
                b.token[i] = t
                b.pos[i] = p + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if j >= from_j else 0
                i += 1
            new_rows[seq] = i - 1 if want else -1
            first_rows[seq] = i - want if want else -1
            for j in range(fill.get(seq, 0)):  # fillers: the last token again, no logits
                b.token[i] = toks[-1]
                b.pos[i] = p + len(toks) + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 0
                i += 1
        b.n_tokens = i
        ctx = self.ctx
        rc = self.compute(lambda: L.llama_decode(ctx, b))
        if rc != 0:
            # The KV of every sequence in the batch is now uncertain.
            for seq in new_rows:
                self.logits_row[seq] = -1
            raise RuntimeError(f"llama_decode failed (code {rc})")
        # Logits rows index this batch only: every other sequence's old row is now stale.
        self.logits_row = dict.fromkeys(self.logits_row, -1)
        for seq, toks, _ in rows:
            self.pos[seq] += len(toks)
            if fill.get(seq) and not L.llama_memory_seq_rm(self.mem, seq, self.pos[seq], -1):
                raise RuntimeError(f"llama.cpp could not remove the filler cells of seq {seq}")
        self.logits_row.update(new_rows)
        return first_rows

    def sampler_new(self, params: SamplerParams) -> Sampler:
        return new_sampler(self.vocab, params, self.n_ctx_seq)

    # ---- sequence state -------------------------------------------------------------------

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} out of range (n_seq_max={self.n_seq})")

    def kv_pack(self, seq: int) -> bytearray:
        self._check_seq(seq)
        size = int(L.llama_state_seq_get_size(self.ctx, seq))
        out = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(out)
        n = int(L.llama_state_seq_get_data(self.ctx, buf, size, seq))
        del buf  # release the export so the bytearray may be resized
        if n != size:
            del out[n:]
        return out

    def kv_unpack(self, seq: int, data: bytes | bytearray | memoryview) -> None:
        self._check_seq(seq)
        n = len(data)
        if isinstance(data, bytearray | memoryview):
            buf: Any = (ctypes.c_uint8 * n).from_buffer(data)
        else:
            # Point at the bytes object's own buffer: no copy of a multi-MB state.
            buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = int(L.llama_state_seq_set_data(self.ctx, buf, n, seq))
        self._forget_sampling(seq)
        if read == 0:
            L.llama_memory_seq_rm(self.mem, seq, 0, -1)
            self.pos[seq] = 0
            raise ValueError("llama.cpp refused the sequence state (wrong model or layout?)")
        self.pos[seq] = int(L.llama_memory_seq_pos_max(self.mem, seq)) + 1

    def _forget_sampling(self, seq: int) -> None:
        """The sequence's cells changed under it: its logits row, saved logits and pending
        draw no longer follow from them."""
        self.logits_row[seq] = -1
        self._saved.pop(seq, None)
        self._pending.pop(seq, None)

    def seq_rm(self, seq: int, start: int, end: int | None) -> None:
        self._check_seq(seq)
        if not L.llama_memory_seq_rm(self.mem, seq, start, -1 if end is None else end):
            raise RuntimeError(f"llama.cpp could not remove cells [{start}, {end}) of seq {seq}")
        self._forget_sampling(seq)
        self.pos[seq] = int(L.llama_memory_seq_pos_max(self.mem, seq)) + 1

    # ---- embeddings and adapters ------------------------------------------------------------

    def embed(self, tokens: Sequence[int]) -> list[float]:
        self._check_tokens(tokens, "prompt")
        if len(tokens) > self.embedding_n_ctx:
            raise InvalidRequest(
                "prompt",
                f"{len(tokens)} tokens exceed the embedding context ({self.embedding_n_ctx})",
            )
        if not self.embed_ctx:
            self.embed_ctx = self._new_embed_context()
            if self._adapters_applied:
                self.adapters_apply(self._adapters_applied)
        ctx = self.embed_ctx
        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(tokens)
            if self.compute(lambda: L.llama_decode(ctx, batch)) != 0:
                raise RuntimeError("llama_decode failed in the embeddings context")
            n_embd = int(L.llama_model_n_embd(self.model))
            ptr = L.llama_get_embeddings_seq(ctx, 0)
            if not ptr:
                ptr = L.llama_get_embeddings_ith(ctx, len(tokens) - 1)
            if not ptr:
                raise RuntimeError("llama.cpp returned no embeddings")
            return [float(ptr[i]) for i in range(n_embd)]
        finally:
            L.llama_batch_free(batch)
            L.llama_memory_clear(L.llama_get_memory(ctx), True)

    def _new_embed_context(self) -> Any:
        p = L.llama_context_default_params()
        n = self.embedding_n_ctx
        p.n_ctx = p.n_batch = p.n_ubatch = n
        p.n_seq_max = 1
        p.n_threads, p.n_threads_batch = self.cparams.n_threads, self.cparams.n_threads_batch
        p.embeddings = True
        p.no_perf = True
        p.pooling_type = {
            "mean": L.LLAMA_POOLING_TYPE_MEAN,
            "last": L.LLAMA_POOLING_TYPE_LAST,
            "cls": L.LLAMA_POOLING_TYPE_CLS,
        }[self.pooling]
        ctx = L.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the embeddings context")
        return ctx

    def adapter_load(self, path: str) -> Any:
        with Path(path).open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF LoRA adapter")
        adapter = L.llama_adapter_lora_init(self.model, path.encode())
        if not adapter:
            raise ValueError(f"llama.cpp refused the adapter {path} (made for another model?)")
        return adapter

    def adapters_apply(self, adapters: Sequence[tuple[Any, float]]) -> None:
        n = len(adapters)
        arr = (L.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in adapters))
        scales = (ctypes.c_float * n)(*(s for _, s in adapters))
        for ctx in (self.ctx, self.embed_ctx):
            if ctx and L.llama_set_adapters_lora(ctx, arr if n else None, n, scales if n else None):
                raise RuntimeError("llama.cpp could not apply the adapter set")
        self._adapters_applied = list(adapters)

    def adapter_free(self, adapter: Any) -> None:
        L.llama_adapter_lora_free(adapter)


def _logprobs(
    logits: np.ndarray[Any, Any], token: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """``token``'s log-probability under raw ``logits`` (log-softmax, before any sampler
    stage), and the ``top`` most likely tokens with theirs."""
    values = logits.astype(np.float64)
    peak = float(values.max())
    log_z = peak + math.log(float(np.exp(values - peak).sum()))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        best = np.argpartition(-values, top - 1)[:top]
        best = best[np.argsort(-values[best], kind="stable")]
        alternatives = tuple((int(t), float(values[t]) - log_z) for t in best)
    return float(values[token]) - log_z, alternatives


def _call(fn: Callable[[], Any]) -> Any:
    return fn()
