"""Exact replay of every reply (erllama.model.replay): whatever version of a reply a client
sends back (as it was, trimmed, without its reasoning, without the stop string that ended
it), the chat template renders the tokens the model produced; across a restart too, when
the cache has file tiers. The stub's tokenizer makes each version's own tokens differ, so
a render equal to the original's proves the replay, not a coincidence of tokenization."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

import erllama
from erllama.backends.llama_chat import split_verbatim
from erllama.model.replay import ReplayMemory, replay_key
from erllama.plugins import BackendRegistry

from .helpers import stub_config

pytestmark = pytest.mark.anyio

THINK = ("<think>", "</think>")
#: What the stub generates: a thinking span, an answer, a stop word (its tokenizer keeps
#: no whitespace but single spaces: trailing whitespace is tested on SmolLM2).
SCRIPT = "<think> kabo rite </think> the answer is blue STOP more"


# ---- the replay key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("  an answer \n", "an answer"),
        ("<think> a b </think> an answer", "an answer"),
        ("<think> a </think> one <think> b </think> two", "one  two"),
        ("<think> never closed", ""),
        # The generation prompt opened the span: the reply holds only its end.
        ("a b </think> an answer", "an answer"),
        ("no markers at all", "no markers at all"),
    ],
)
def test_the_replay_key_drops_thinking_and_outer_whitespace(text: str, key: str) -> None:
    assert replay_key(text, THINK) == key


def test_without_markers_only_whitespace_is_dropped() -> None:
    assert replay_key(" <think> a </think> b ", None) == "<think> a </think> b"


def test_every_version_of_a_reply_resolves_to_it() -> None:
    memory = ReplayMemory()
    memory.thinking = THINK
    text = "<think> t </think> answer \n STOP"
    learned = memory.remember(text, [1, 2, 3], stop="STOP")
    assert [key for key, _ in learned] == ["answer \n STOP", "answer"]
    for sent in (text, "answer \n STOP", "answer", "answer \n", " answer"):
        messages, verbatim = memory.resolve([{"role": "assistant", "content": sent}])
        assert messages == [{"role": "assistant", "content": text}]
        assert verbatim == [(text, (1, 2, 3))]
    other = [{"role": "user", "content": "answer"}, {"role": "assistant", "content": "other"}]
    assert memory.resolve(other) == (other, [])
    assert memory.unknown(other) == ["other"]


def test_an_empty_key_claims_nothing() -> None:
    # A reply that was all thinking: the empty content of a tool-call message must not
    # turn into it.
    memory = ReplayMemory()
    memory.thinking = THINK
    assert memory.remember("<think> only </think>  ", [1, 2]) == []
    empty = [{"role": "assistant", "content": ""}]
    assert memory.resolve(empty) == (empty, [])


def test_memory_is_bounded_least_recently_used_first() -> None:
    memory = ReplayMemory(entries=2)
    memory.remember("one", [1])
    memory.remember("two", [2])
    memory.resolve([{"role": "assistant", "content": "one"}])  # one is now the most recent
    memory.remember("three", [3])
    assert len(memory) == 2
    assert memory.unknown([{"role": "assistant", "content": c} for c in ("one", "two")]) == ["two"]


# ---- through the engine --------------------------------------------------------------------------


def thinking_model() -> erllama.ModelConfig:
    return attrs.evolve(
        stub_config(script=SCRIPT),
        thinking_markers=erllama.ThinkingMarkers(start=THINK[0], end=THINK[1]),
    )


def cached(tmp_path: Path) -> erllama.EngineConfig:
    return erllama.EngineConfig(
        cache=erllama.CacheConfig(ram_file_dir=tmp_path / "shm", disk_dir=tmp_path / "disk")
    )


QUESTION = {"role": "user", "content": "what colour"}


def history(reply: str) -> list[dict[str, str]]:
    return [QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "why"}]


async def reply_of(engine: erllama.Engine, mid: str) -> erllama.Done:
    stream = await engine.chat(mid, [QUESTION], max_tokens=200, stop=["STOP"])
    events = [ev async for ev in stream]
    done = events[-1]
    assert isinstance(done, erllama.Done) and done.reply_text is not None
    return done


def versions(done: erllama.Done) -> dict[str, str]:
    """What clients send back for ``done``'s reply."""
    text = done.reply_text
    assert text is not None and text.endswith("STOP") and "</think>" in text
    visible = text.split("</think>", 1)[1].removesuffix("STOP")
    return {
        "as generated": text,
        "as shown (no thinking, no stop string)": visible,
        "trimmed": visible.strip(),
        "thinking kept, trimmed": text.removesuffix("STOP").rstrip(),
    }


async def test_every_version_of_a_reply_renders_the_tokens_the_model_produced(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    async with erllama.open_engine(cached(tmp_path), backends=registry) as engine:
        mid = await engine.load_model("m", thinking_model())
        done = await reply_of(engine, mid)
        assert done.reply_text is not None
        exact = await engine.apply_chat_template(mid, history(done.reply_text))
        start = exact.index(done.token_ids[0])
        assert tuple(exact[start : start + len(done.token_ids)]) == done.token_ids
        for name, sent in versions(done).items():
            assert await engine.apply_chat_template(mid, history(sent)) == exact, name
    # A restart: the replies come back from the records beside the rows.
    async with erllama.open_engine(cached(tmp_path), backends=registry) as engine:
        mid = await engine.load_model("m", thinking_model())
        for name, sent in versions(done).items():
            assert await engine.apply_chat_template(mid, history(sent)) == exact, name
    # The reference: with no memory, a trimmed reply renders its own, different tokens.
    off = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(off, backends=registry) as engine:
        mid = await engine.load_model("m", thinking_model())
        trimmed = versions(done)["trimmed"]
        assert await engine.apply_chat_template(mid, history(trimmed)) != exact


async def test_replies_are_kept_per_model_fingerprint(
    registry: BackendRegistry, tmp_path: Path
) -> None:
    async with erllama.open_engine(cached(tmp_path), backends=registry) as engine:
        mid = await engine.load_model("m", thinking_model())
        done = await reply_of(engine, mid)
    other = attrs.evolve(thinking_model(), fingerprint="ab" * 32)
    async with erllama.open_engine(cached(tmp_path), backends=registry) as engine:
        mid = await engine.load_model("m", other)
        trimmed = versions(done)["trimmed"]
        rendered = await engine.apply_chat_template(mid, history(trimmed))
        assert done.reply_text is not None
        assert rendered != await engine.apply_chat_template(mid, history(done.reply_text))


# ---- splicing ids into the rendered text ---------------------------------------------------------


def test_two_replies_with_the_same_text_are_two_occurrences() -> None:
    # An agent calling the same tool twice: each reply's ids go to its own occurrence.
    text = "u: a </s> x: R </s> u: b </s> x: R </s>"
    assert split_verbatim(text, [("R", [1]), ("R", [2])]) == [
        "u: a </s> x: ",
        [1],
        " </s> u: b </s> x: ",
        [2],
        " </s>",
    ]


def test_a_verbatim_text_absent_after_the_previous_one_is_skipped() -> None:
    assert split_verbatim("A B", [("B", [2]), ("A", [1])]) == ["A ", [2]]
    assert split_verbatim("A B", [("C", [3]), ("B", [2])]) == ["A ", [2]]
    assert split_verbatim("A B", []) == ["A B"]
