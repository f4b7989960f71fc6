"""erllama's greedy tokens against a plain llama-cpp-python loop written here.

The reference drives llama.cpp's low-level bindings itself: its own model, context, batch and
greedy sampler, and its own prefill, sampling and stopping logic. It takes nothing from
erllama's backend but ``ensure_backend`` (``llama_backend_init`` and log routing, once per
process). Its context is built the way erllama documents its own: ``n_ctx`` cells per
sequence (``n_ctx * n_seq`` in all, ``kv_unified`` off), the same ``n_batch``, ``n_ubatch``,
threads, f16 KV, CPU only, and flash attention on llama.cpp's AUTO (``flash_attn=None``).

Batch composition is mirrored too: llama.cpp's output could in principle depend on which
rows share a ``llama_decode``, so the batched reference feeds each prompt in the same steps
and slices as erllama did (read from a spy plugin), and decodes one token per running
sequence per ``llama_decode``, like erllama. The tokens are the reference's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import attrs
import llama_cpp as L
import pytest

import erllama
from erllama.backends.llama_native import ensure_backend

from .grid import GRID_FEEDING
from .recording import RecordingLlama

pytestmark = pytest.mark.anyio


@pytest.fixture
def smol_config(smol_config: erllama.ModelConfig) -> erllama.ModelConfig:
    """On the grid: the plain loops here mirror the grid's chunks and calls; padded
    feeding is checked against its own plain loop in test_padded_prefill_real.py."""
    return attrs.evolve(smol_config, options=GRID_FEEDING)


N_TOKENS = 24

#: (sequence, prompt tokens fed into it) for one step.
Feed = tuple[int, int]


@attrs.frozen
class Reference:
    #: Per sequence: the tokens sampled, an end-of-generation token included if one was.
    tokens: dict[int, list[int]]
    #: Per step: the sequences that decoded a token, in batch order.
    decodes: list[list[int]]
    #: End-of-generation token ids of the model, as llama.cpp's vocabulary says.
    eog: frozenset[int]

    def expect(self, seq: int) -> tuple[tuple[int, ...], str]:
        """What erllama should report for ``seq``: its tokens (an end-of-generation token is
        never streamed) and its finish reason."""
        toks = self.tokens[seq]
        if toks and toks[-1] in self.eog:
            return tuple(toks[:-1]), "stop"
        return tuple(toks), "length"


def plain_greedy(
    model_path: Path,
    prompts: Mapping[int, Sequence[int]],
    feeds: Sequence[Sequence[Feed]],
    *,
    n_ctx: int,
    n_batch: int,
    n_threads: int,
    max_tokens: int,
) -> Reference:
    """Greedy generation of ``prompts[seq]`` in sequence ``seq`` of one llama.cpp context.

    Step ``i`` first samples a token for every running sequence (in the order the sequences
    started) from the logits of the previous ``llama_decode``, then decodes in ONE
    ``llama_decode`` those tokens, one row each, followed by the prompt slices ``feeds[i]``
    (logits only on a prompt's last token). A sequence runs from the step after its last
    prompt slice until it has sampled an end-of-generation token or ``max_tokens``.
    """
    ensure_backend()
    n_seq = len(prompts)
    model = ctx = sampler = None
    batch = None
    try:
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
        model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
        assert model, "llama.cpp could not load the model"
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.kv_unified = False
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.type_k = cparams.type_v = L.GGML_TYPE_F16
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
        cparams.embeddings = False
        ctx = L.llama_init_from_model(model, cparams)
        assert ctx, "llama.cpp could not create the context"
        vocab = L.llama_model_get_vocab(model)
        batch = L.llama_batch_init(n_batch, 0, n_seq)
        sampler = L.llama_sampler_init_greedy()

        def done(seq: int) -> bool:
            toks = out[seq]
            return bool(toks) and (len(toks) >= max_tokens or L.llama_vocab_is_eog(vocab, toks[-1]))

        out: dict[int, list[int]] = {seq: [] for seq in prompts}
        fed = dict.fromkeys(prompts, 0)
        pos = dict.fromkeys(prompts, 0)
        started: list[int] = []
        running: list[int] = []
        logits_row: dict[int, int] = {}
        decodes: list[list[int]] = []
        step = 0
        while step < len(feeds) or running:
            rows: list[tuple[int, Sequence[int], bool]] = []
            for seq in running:
                tok = int(L.llama_sampler_sample(sampler, ctx, logits_row[seq]))
                out[seq].append(tok)
                rows.append((seq, [tok], True))
            decodes.append(list(running))
            for seq, n in feeds[step] if step < len(feeds) else ():
                if seq not in started:
                    started.append(seq)
                piece = prompts[seq][fed[seq] : fed[seq] + n]
                assert len(piece) == n
                fed[seq] += n
                rows.append((seq, piece, fed[seq] == len(prompts[seq])))
            assert rows, f"step {step} has nothing to decode"
            i = 0
            logits_row = {}
            for seq, toks, want in rows:
                for j, t in enumerate(toks):
                    batch.token[i] = t
                    batch.pos[i] = pos[seq] + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = want and j == len(toks) - 1
                    i += 1
                pos[seq] += len(toks)
                if want:
                    logits_row[seq] = i - 1
            batch.n_tokens = i
            assert L.llama_decode(ctx, batch) == 0
            step += 1
            running = [s for s in started if fed[s] == len(prompts[s]) and not done(s)]
        n_vocab = L.llama_vocab_n_tokens(vocab)
        eog = frozenset(t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t))
        return Reference(tokens=out, decodes=decodes, eog=eog)
    finally:
        if sampler:
            L.llama_sampler_free(sampler)
        if batch is not None:
            L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        if model:
            L.llama_model_free(model)


def check_mirrors_defaults(config: erllama.ModelConfig) -> None:
    """The reference builds its context from these settings as erllama's defaults have them."""
    assert config.flash_attn is None  # erllama: None -> LLAMA_FLASH_ATTN_TYPE_AUTO
    assert (config.type_k, config.type_v) == ("f16", "f16")
    assert config.n_ubatch is None and config.n_batch <= 512  # erllama: n_ubatch = n_batch
    assert config.n_gpu_layers == 0 and config.use_mmap and config.options == GRID_FEEDING
    assert config.n_threads_batch is None and config.n_threads is not None


async def test_one_sequence_matches_the_plain_loop(
    llama_engine: erllama.Engine, smol_config: erllama.ModelConfig, smol_path: Path
) -> None:
    config = attrs.evolve(smol_config, keep_live_kv=False)
    check_mirrors_defaults(config)
    mid = await llama_engine.load_model("smol", config)
    # Its greedy tokens are sensitive to the arithmetic: with flash attention off in the
    # reference (other rounding), its third token already differs.
    chat = [{"role": "user", "content": "Say hello."}]
    prompt = await llama_engine.apply_chat_template(mid, chat)
    got = await llama_engine.complete(mid, prompt, max_tokens=N_TOKENS)
    assert got.cache_hit_kind == "cold"
    await llama_engine.unload_model(mid)

    # The reference prefills in erllama's documented slices (ModelConfig.prefill_chunk).
    chunk = config.effective_prefill_chunk
    feeds = [[(0, len(prompt[i : i + chunk]))] for i in range(0, len(prompt), chunk)]
    ref = await anyio.to_thread.run_sync(
        lambda: plain_greedy(
            smol_path,
            {0: prompt},
            feeds,
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=config.n_threads or 0,
            max_tokens=N_TOKENS,
        )
    )
    assert (got.token_ids, got.finish_reason) == ref.expect(0)
    assert len(got.token_ids) == N_TOKENS  # all of them compared: no early stop


async def test_three_batched_sequences_match_the_batched_plain_loop(
    no_cache: erllama.EngineConfig, smol_config: erllama.ModelConfig, smol_path: Path
) -> None:
    check_mirrors_defaults(smol_config)
    questions = [
        "What is 2+2?",  # a short answer: it stops while the others run on
        "Write a poem about the sea.",
        "Say hello.",
    ]
    spy = RecordingLlama()
    got: dict[int, erllama.Completion] = {}
    async with erllama.open_engine(no_cache, backends=spy.registry()) as engine:
        mid = await engine.load_model("trio", attrs.evolve(smol_config, backend="spy", n_seq_max=3))
        prompts = [
            await engine.apply_chat_template(mid, [{"role": "user", "content": q}])
            for q in questions
        ]

        async def run(i: int) -> None:
            got[i] = await engine.complete(mid, prompts[i], max_tokens=N_TOKENS)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
    assert all(c.cache_hit_kind == "cold" for c in got.values())
    # Evidence of batching: all three sequences decoded in one step.
    assert spy.most_decoding() == 3

    # What erllama fed, step by step: each prompt whole, in its own sequence.
    feeds = [[(op[1], len(op[2])) for op in step if op[0] == "prefill"] for step in spy.steps]
    fed: dict[int, list[int]] = {}
    for step in spy.steps:
        for kind, seq, toks, _ in step:
            if kind == "prefill":
                fed.setdefault(seq, []).extend(toks)
    assert sorted(fed.values()) == sorted(prompts)
    prompt_of = {seq: prompts.index(toks) for seq, toks in fed.items()}

    ref = await anyio.to_thread.run_sync(
        lambda: plain_greedy(
            smol_path,
            {seq: prompts[i] for seq, i in prompt_of.items()},
            feeds,
            n_ctx=smol_config.n_ctx,
            n_batch=smol_config.n_batch,
            n_threads=smol_config.n_threads or 0,
            max_tokens=N_TOKENS,
        )
    )
    for seq, i in prompt_of.items():
        assert (got[i].token_ids, got[i].finish_reason) == ref.expect(seq), questions[i]
    # The reference, stopping by its own tokens, ran the same steps as erllama (the order of
    # rows inside one batch is its own: erllama feeds the shortest prompt first).
    assert [sorted(d) for d in ref.decodes] == [
        sorted(op[1] for op in s if op[0] == "decode") for s in spy.steps
    ]
    # One sequence ended at an end-of-generation token while the others ran on.
    assert sorted(got[i].finish_reason for i in got) == ["length", "length", "stop"]
