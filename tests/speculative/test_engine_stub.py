"""Speculative decoding through the engine, on the stub (both event loops).

The stub computes each token on its own, so a draft it accepts is exactly what it would have
decoded: every answer here must equal the same request decoded plainly, whatever the drafter
proposed. Drafters: the built-in ``ngram`` (on a scripted stub that copies its prompt), an
``oracle`` that proposes the plain run's tokens (every draft accepted), and a ``liar`` whose
drafts are always wrong (none accepted).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import attrs
import pytest

import erllama
from erllama.backends import Decode
from erllama.backends.stub import EOS, StubControl
from erllama.plugins import BackendRegistry
from erllama.speculative import hookimpl, make_drafter_registry
from erllama.speculative import ngram as ngram_plugin

from ..helpers import stub_config, words

pytestmark = pytest.mark.anyio

PROMPT = [1, *range(300, 340)]


class Oracle:
    """Proposes the tokens the plain run generated after the prompt (``answers``)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[int, ...], tuple[int, ...]] = {}

    @hookimpl
    def drafter_new(self, config: erllama.SpeculativeConfig) -> Any:
        oracle = self

        class Draft:
            def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
                for prompt, answer in oracle.answers.items():
                    if tuple(context[: len(prompt)]) == prompt:
                        done = len(context) - len(prompt) + 1
                        return list(answer[done : done + n])
                return []

        return Draft()


class Liar:
    @hookimpl
    def drafter_new(self, config: erllama.SpeculativeConfig) -> Any:
        class Draft:
            def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
                return [EOS + 1] * n  # never what the stub says next

        return Draft()


@pytest.fixture
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture
async def engine(
    registry: BackendRegistry, no_cache: erllama.EngineConfig, oracle: Oracle
) -> AsyncIterator[erllama.Engine]:
    drafters = make_drafter_registry(
        {"ngram": ngram_plugin, "oracle": oracle, "liar": Liar()}, autoload=False
    )
    async with erllama.open_engine(no_cache, backends=registry, drafters=drafters) as eng:
        yield eng


def speculative(drafter: str, draft_max: int = 8, **options: Any) -> erllama.ModelConfig:
    return attrs.evolve(
        stub_config(**options),
        speculative=erllama.SpeculativeConfig(drafter=drafter, draft_max=draft_max),
    )


async def plain(
    engine: erllama.Engine, prompt: Any, options: dict[str, Any] | None = None, **kw: Any
) -> erllama.Completion:
    """The request decoded plainly: a stub with ``options`` and no speculative decoding."""
    mid = await engine.load_model(None, stub_config(**options or {}))
    try:
        return await engine.complete(mid, prompt, **kw)
    finally:
        await engine.unload_model(mid)


async def test_the_ngram_drafter_copies_the_prompt_in_fewer_steps(engine: erllama.Engine) -> None:
    text = words(40, start=10)
    control = StubControl()
    mid = await engine.load_model(
        "spec", speculative("ngram", draft_max=8, script=text, control=control)
    )
    prompt = "Copy: " + text + " Copy:"
    done = await engine.complete(mid, prompt, max_tokens=60)
    reference = await plain(engine, prompt, {"script": text}, max_tokens=60)
    assert done.token_ids == reference.token_ids
    assert done.text == reference.text == " " + text
    assert done.finish_reason == reference.finish_reason == "stop"
    stats = done.stats
    assert stats.draft_accepted >= 30  # the copy, but for its first tokens
    assert stats.draft_tokens >= stats.draft_accepted
    decodes = sum(1 for ops in control.history for op in ops if isinstance(op, Decode))
    assert decodes <= len(done.token_ids) + 1 - stats.draft_accepted


async def test_accepted_drafts_equal_plain_decoding(engine: erllama.Engine, oracle: Oracle) -> None:
    reference = await plain(engine, PROMPT, max_tokens=50)
    oracle.answers[tuple(PROMPT)] = reference.token_ids
    control = StubControl()
    mid = await engine.load_model("spec", speculative("oracle", draft_max=6, control=control))
    done = await engine.complete(mid, PROMPT, max_tokens=50)
    assert done.token_ids == reference.token_ids
    assert len(done.token_ids) == 50  # max_tokens exactly, though drafts were longer
    # Every step decoded its token plus a draft (growing with the acceptance, up to 6
    # tokens), all accepted: one prefill step, then far fewer steps than tokens.
    assert done.stats.draft_accepted == done.stats.draft_tokens == 50 - control.steps + 1
    assert control.steps <= 50 // 4
    assert done.context_tokens[-50:] == reference.token_ids


async def test_rejected_drafts_change_nothing_and_drafting_pauses(
    engine: erllama.Engine,
) -> None:
    reference = await plain(engine, PROMPT, max_tokens=200)
    mid = await engine.load_model("spec", speculative("liar", draft_max=8))
    done = await engine.complete(mid, PROMPT, max_tokens=200)
    assert done.token_ids == reference.token_ids
    assert done.context_tokens == reference.context_tokens
    assert done.stats.draft_accepted == 0
    # Two failed drafts, then pauses of 1, 2, 4 ... steps: far fewer than a draft a step.
    assert 0 < done.stats.draft_tokens < 200 // 4


async def test_an_end_of_generation_inside_a_draft_ends_the_request(
    engine: erllama.Engine, oracle: Oracle
) -> None:
    script = words(12, start=50)
    reference = await plain(engine, PROMPT, {"script": script}, max_tokens=40)
    assert reference.finish_reason == "stop" and len(reference.token_ids) == 12
    oracle.answers[tuple(PROMPT)] = (*reference.token_ids, EOS, *range(400, 420))
    mid = await engine.load_model("spec", speculative("oracle", draft_max=16, script=script))
    done = await engine.complete(mid, PROMPT, max_tokens=40)
    assert (done.token_ids, done.finish_reason) == (reference.token_ids, "stop")
    assert done.context_tokens == reference.context_tokens


async def test_a_stop_string_inside_a_draft_ends_the_request_there(
    engine: erllama.Engine, oracle: Oracle
) -> None:
    reference = await plain(engine, PROMPT, max_tokens=40)
    cut = reference.text.split()[10]
    expected = await plain(engine, PROMPT, max_tokens=40, stop=[cut])
    oracle.answers[tuple(PROMPT)] = reference.token_ids
    mid = await engine.load_model("spec", speculative("oracle", draft_max=16))
    done = await engine.complete(mid, PROMPT, max_tokens=40, stop=[cut])
    assert (done.text, done.token_ids, done.finish_reason) == (
        expected.text,
        expected.token_ids,
        "stop",
    )
    assert done.stats.stop_sequence == cut


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "top_k": 20, "seed": 5}], ids=["greedy", "drawn"]
)
async def test_sequences_batched_together_each_equal_plain_decoding(
    engine: erllama.Engine, oracle: Oracle, sampling: dict[str, Any]
) -> None:
    prompts = [[1, *range(300 + 10 * i, 330 + 10 * i)] for i in range(4)]
    references = [await plain(engine, p, max_tokens=30, **sampling) for p in prompts]
    for p, r in zip(prompts, references, strict=True):
        # Half of each answer right, then wrong: drafts are accepted in part.
        oracle.answers[tuple(p)] = (*r.token_ids[:15], *range(900, 930))
    mid = await engine.load_model("spec", speculative("oracle", draft_max=4, n_seq_max=4))
    results: dict[int, erllama.Completion] = {}

    async def one(i: int) -> None:
        results[i] = await engine.complete(mid, prompts[i], max_tokens=30, **sampling)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    for i, r in enumerate(references):
        assert results[i].token_ids == r.token_ids
        assert 0 < results[i].stats.draft_accepted < results[i].stats.draft_tokens


async def test_requests_that_draw_speculate_and_keep_the_plain_draws(
    engine: erllama.Engine, oracle: Oracle
) -> None:
    # Drafts right for a while, then wrong: each seed's answer is the plain decode's.
    drawn = {"temperature": 0.8, "top_k": 40}
    prompts = [[1, *range(400 + 7 * i, 440 + 7 * i)] for i in range(12)]
    references = []
    for seed, p in enumerate(prompts):
        r = await plain(engine, p, max_tokens=30, seed=seed, **drawn)
        references.append(r)
        oracle.answers[tuple(p)] = (*r.token_ids[: 5 + seed], *range(900, 930))
    mid = await engine.load_model("spec", speculative("oracle", draft_max=4))
    accepted = drafted = 0
    for seed, (p, r) in enumerate(zip(prompts, references, strict=True)):
        done = await engine.complete(mid, p, max_tokens=30, seed=seed, **drawn)
        assert done.token_ids == r.token_ids, seed
        assert done.context_tokens == r.context_tokens
        accepted += done.stats.draft_accepted
        drafted += done.stats.draft_tokens
    assert 0 < accepted < drafted
    # A greedy request's draft differs from the draw's: the same oracle's drafts for the
    # drawn answers are rejected when the request decodes greedily.
    greedy = await engine.complete(mid, prompts[0], max_tokens=30)
    assert greedy.token_ids == (await plain(engine, prompts[0], max_tokens=30)).token_ids


async def test_opting_out_decodes_plainly(engine: erllama.Engine) -> None:
    mid = await engine.load_model("spec", speculative("liar"))
    off = await engine.complete(mid, PROMPT, max_tokens=20, speculative=False)
    no_draft = await engine.complete(mid, PROMPT, max_tokens=20, draft_max=0)
    for done in (off, no_draft):
        assert (done.stats.draft_tokens, done.stats.draft_accepted) == (0, 0)
    assert (
        off.token_ids
        == no_draft.token_ids
        == (await plain(engine, PROMPT, max_tokens=20)).token_ids
    )


async def test_what_cannot_speculate_is_refused_by_name(engine: erllama.Engine) -> None:
    spec = await engine.load_model("spec", speculative("ngram"))
    bare = await engine.load_model("bare", stub_config())
    with pytest.raises(erllama.InvalidRequest, match=r"speculative.*ModelConfig.speculative"):
        await engine.complete(bare, PROMPT, max_tokens=4, speculative=True)
    with pytest.raises(erllama.InvalidRequest, match=r"speculative.*thinking budget"):
        await engine.complete(
            spec, PROMPT, max_tokens=4, speculative=True, thinking_budget_tokens=4
        )
    with pytest.raises(erllama.InvalidRequest, match=r"speculative.*logprobs"):
        await engine.complete(spec, PROMPT, max_tokens=4, speculative=True, logprobs=1)
    for bad in (-1, 63, 1.5, True):
        with pytest.raises(erllama.InvalidRequest, match="draft_max"):
            await engine.complete(spec, PROMPT, max_tokens=4, draft_max=bad)
    with pytest.raises(erllama.InvalidRequest, match=r"speculative"):
        await engine.complete(spec, PROMPT, max_tokens=4, speculative="yes")  # type: ignore[typeddict-item]
    # Both models serve on.
    assert len((await engine.complete(spec, PROMPT, max_tokens=4)).token_ids) == 4
    assert (
        len((await engine.complete(bare, PROMPT, max_tokens=4, speculative=False)).token_ids) == 4
    )


async def test_an_unknown_drafter_is_refused_at_load(engine: erllama.Engine) -> None:
    with pytest.raises(erllama.ConfigError, match=r"speculative.drafter.*'nope'"):
        await engine.load_model("spec", speculative("nope"))
    assert engine.list_models() == [] or all(m.id != "spec" for m in engine.list_models())


def test_speculative_settings_are_checked() -> None:
    with pytest.raises(erllama.ConfigError, match="flash_attn"):
        erllama.ModelConfig(flash_attn=False, speculative={})
    with pytest.raises(erllama.ConfigError, match="n_threads"):
        erllama.ModelConfig(n_threads=2, speculative={})
    erllama.ModelConfig(n_threads=1, flash_attn=True, n_threads_batch=2, speculative={})
    config = erllama.ModelConfig(speculative={"draft_max": 4, "ngram_min": 1})
    assert config.speculative == erllama.SpeculativeConfig(draft_max=4, ngram_min=1)
    with pytest.raises(erllama.ConfigError, match=r"speculative.ngram_min"):
        erllama.ModelConfig(speculative={"ngram_min": 5, "ngram_max": 2})
    for bad in (0, 63):
        with pytest.raises(erllama.ConfigError, match=r"speculative.draft_max"):
            erllama.ModelConfig(speculative={"draft_max": bad})


async def test_verify_answers_how_much_of_a_draft_the_model_takes(
    engine: erllama.Engine,
) -> None:
    reference = await plain(engine, PROMPT, max_tokens=12)
    ids = list(reference.token_ids)
    mid = await engine.load_model("bare", stub_config())  # verify needs no speculative config
    whole = await engine.verify(mid, PROMPT, ids[:8])
    assert whole == erllama.Verification(accepted=8, next_token=ids[8])
    part = await engine.verify(mid, PROMPT, [*ids[:3], EOS + 1, *ids[4:8]])
    assert part == erllama.Verification(accepted=3, next_token=ids[3])
    none = await engine.verify(mid, PROMPT, [EOS + 1])
    assert none == erllama.Verification(accepted=0, next_token=ids[0])
    # Nothing was left running, and the model serves on.
    assert (await engine.complete(mid, PROMPT, max_tokens=12)).token_ids == reference.token_ids


async def test_verify_reports_an_end_of_generation(engine: erllama.Engine) -> None:
    script = words(3, start=50)
    reference = await plain(engine, PROMPT, {"script": script}, max_tokens=8)
    ids = list(reference.token_ids)
    assert len(ids) == 3
    mid = await engine.load_model("s", stub_config(script=script))
    done = await engine.verify(mid, PROMPT, [*ids, 77, 78])
    assert done == erllama.Verification(accepted=3, next_token=EOS, eog=True)


async def test_draft_tokens_asks_the_models_drafter(engine: erllama.Engine) -> None:
    mid = await engine.load_model("spec", speculative("ngram"))
    context = [1, 10, 11, 12, 13, 14, 15, 2, 10, 11]
    assert await engine.draft_tokens(mid, context, 3) == [12, 13, 14]
    assert await engine.draft_tokens(mid, context, 0) == []
    assert await engine.draft_tokens(mid, [5, 6, 7], 4) == []
    bare = await engine.load_model("bare", stub_config())
    with pytest.raises(erllama.InvalidRequest, match=r"ModelConfig\.speculative"):
        await engine.draft_tokens(bare, context, 3)
    for bad_context, bad_n, field in (([], 2, "context"), (context, -1, "n"), ([-5], 2, "context")):
        with pytest.raises(erllama.InvalidRequest, match=field):
            await engine.draft_tokens(mid, bad_context, bad_n)
    with pytest.raises(erllama.InvalidRequest, match="draft"):
        await engine.verify(bare, PROMPT, [])


async def test_tool_call_spans_come_out_the_same_with_drafts(
    engine: erllama.Engine, oracle: Oracle
) -> None:
    script = 'kabo <tool_call> {"name":"wéather"} </tool_call> rite'
    markers = erllama.ToolCallMarkers(start="<tool_call>", end="</tool_call>")
    plain_config = attrs.evolve(stub_config(script=script), tool_call_markers=markers)
    mid = await engine.load_model(None, plain_config)
    reference = await engine.complete(mid, PROMPT, max_tokens=100)
    await engine.unload_model(mid)
    assert reference.tool_calls  # the script's call is a call
    oracle.answers[tuple(PROMPT)] = reference.token_ids
    config = attrs.evolve(
        plain_config, speculative=erllama.SpeculativeConfig(drafter="oracle", draft_max=8)
    )
    mid = await engine.load_model("spec", config)
    done = await engine.complete(mid, PROMPT, max_tokens=100)
    assert (done.text, done.tool_calls, done.token_ids) == (
        reference.text,
        reference.tool_calls,
        reference.token_ids,
    )
    assert done.stats.draft_accepted > 0


async def test_a_request_cancelled_between_drafting_steps_ends_at_once(
    engine: erllama.Engine, oracle: Oracle
) -> None:
    reference = await plain(engine, PROMPT, max_tokens=200)
    oracle.answers[tuple(PROMPT)] = reference.token_ids
    control = StubControl(permits=threading.Semaphore(0))
    mid = await engine.load_model("spec", speculative("oracle", draft_max=4, control=control))
    stream = await engine.infer(mid, PROMPT, max_tokens=200)
    control.permits.release(3)  # the prefill and two drafting steps
    got: list[int] = []
    async with stream:
        async for ev in stream:
            if isinstance(ev, erllama.Token):
                got.append(ev.token_id)
            if len(got) >= 2:
                break  # leaving the stream cancels the request
    control.open()
    # Nothing more ran for it: what it streamed is the plain answer's beginning, and the
    # model answers the next request as plainly as ever.
    assert tuple(got) == reference.token_ids[: len(got)]
    assert control.steps <= 4
    again = await engine.complete(mid, PROMPT, max_tokens=20)
    assert again.token_ids == reference.token_ids[:20]
