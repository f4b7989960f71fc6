"""The stub backend's promises: determinism, a grammar that constrains, adapters that matter."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import erllama
from erllama import Token
from erllama.backends import stub
from erllama.backends.stub import StubControl

from .helpers import metered, release, stub_config, wait_for

pytestmark = pytest.mark.anyio


async def test_same_prompt_and_seed_give_the_same_tokens(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    kw = {"max_tokens": 12, "temperature": 0.8, "top_k": 20, "seed": 42}
    a = await engine.complete(mid, "a prompt", **kw)
    b = await engine.complete(mid, "a prompt", **kw)
    c = await engine.complete(mid, "a prompt", **{**kw, "seed": 43})
    greedy = await engine.complete(mid, "a prompt", max_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert greedy.token_ids != a.token_ids
    # Temperature 0 ignores the seed.
    assert (
        greedy.token_ids
        == (await engine.complete(mid, "a prompt", max_tokens=12, seed=9)).token_ids
    )


async def test_grammar_constrains_output_and_does_not_leak(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    grammar = 'root ::= answer\nanswer ::= "yes" | "no" | ("maybe" " " "later")'
    seen = set()
    for seed in range(12):
        r = await engine.complete(
            mid, "well?", grammar=grammar, temperature=1.0, seed=seed, max_tokens=40
        )
        assert r.finish_reason == "stop"
        seen.add(r.text.strip())
    assert seen <= {"yes", "no", "maybe later"} and len(seen) >= 2
    free = await engine.complete(mid, "well?", max_tokens=5)
    assert free.finish_reason == "length"  # the grammar did not stick to the model


async def test_multibyte_characters_split_across_tokens_stream_unbroken(
    engine: erllama.Engine,
) -> None:
    mid = await engine.load_model("m", stub_config())
    text = "héllo→日本語🙂"
    stream = await engine.infer(mid, "say it", grammar=f'root ::= "{text}"', max_tokens=100)
    pieces = [ev async for ev in stream if isinstance(ev, Token)]
    assert len(pieces) > len(text)  # byte tokens: characters really were split
    assert all("\ufffd" not in p.text for p in pieces)
    assert "".join(p.text for p in pieces) == text


async def test_damaged_stub_states_are_refused(engine: erllama.Engine) -> None:
    ctl = StubControl()
    await engine.load_model("m", stub_config(control=ctl))
    backend = erllama.make_backend_registry({"stub": stub}, autoload=False).get("stub")
    with pytest.raises(erllama.BackendError):
        backend.kv_unpack(ctl.model, 0, b"ERSTUBKV" + b"\x00" * 3)


async def test_embeddings_and_chat_template_are_deterministic(engine: erllama.Engine) -> None:
    mid = await engine.load_model("m", stub_config())
    a, b = await engine.embed(mid, "alpha"), await engine.embed(mid, "beta")
    assert a == await engine.embed(mid, "alpha") and a != b
    assert abs(sum(x * x for x in a) - 1.0) < 1e-9
    msgs = [{"role": "user", "content": "hi there"}]
    plain = await engine.apply_chat_template(mid, msgs)
    with_system = await engine.apply_chat_template(mid, msgs, system="be brief")
    assert plain == await engine.apply_chat_template(mid, msgs)
    assert len(with_system) > len(plain)
    with pytest.raises(erllama.InvalidRequest):
        await engine.apply_chat_template(mid, [{"role": "user", "content": ["blocks"]}])


def _adapter(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"STUBLORA" + name.encode())
    return str(path)


async def test_adapters_change_output_and_fold_into_the_fingerprint(
    engine: erllama.Engine, tmp_path: Path
) -> None:
    mid = await engine.load_model("m", stub_config())
    base = await engine.complete(mid, "lora test", max_tokens=8)
    base_fp = engine.model_info(mid).effective_fingerprint
    h1 = await engine.load_adapter(mid, _adapter(tmp_path, "one"))
    tuned = await engine.complete(mid, "lora test", max_tokens=8)
    fp1 = engine.model_info(mid).effective_fingerprint
    assert tuned.token_ids != base.token_ids and fp1 != base_fp
    await engine.set_adapter_scale(mid, h1, 0.0)
    assert (await engine.complete(mid, "lora test", max_tokens=8)).token_ids == base.token_ids
    assert engine.model_info(mid).effective_fingerprint == base_fp
    await engine.set_adapter_scale(mid, h1, 1.0)
    h2 = await engine.load_adapter(mid, _adapter(tmp_path, "two"))
    both = engine.model_info(mid).effective_fingerprint
    assert [a.handle for a in engine.list_adapters(mid)] == [h1, h2]
    # Order does not matter: unload and re-attach in the other order.
    await engine.unload_adapter(mid, h1)
    await engine.unload_adapter(mid, h1)  # idempotent
    await engine.load_adapter(mid, _adapter(tmp_path, "one"))
    assert engine.model_info(mid).effective_fingerprint == both
    with pytest.raises(erllama.InvalidRequest):
        await engine.set_adapter_scale(mid, 999, 1.0)
    with pytest.raises(erllama.InvalidRequest) as exc:
        await engine.load_adapter(mid, str(tmp_path / "missing.gguf"))
    assert exc.value.param == "path"
    not_adapter = tmp_path / "not.gguf"
    not_adapter.write_bytes(b"GGUF....")
    with pytest.raises(erllama.BackendError):
        await engine.load_adapter(mid, str(not_adapter))
    assert (await engine.complete(mid, "still serving", max_tokens=2)).token_ids


async def test_an_adapter_change_waits_for_running_requests(
    engine: erllama.Engine, tmp_path: Path
) -> None:
    ctl = metered()
    mid = await engine.load_model("m", stub_config(control=ctl))
    release(ctl, 7)  # one prefill step, then six decodes
    base = await engine.complete(mid, "keep my adapters", max_tokens=6)
    running = await engine.infer(mid, "keep my adapters", max_tokens=6)
    await wait_for(lambda: ctl.steps == 8 and ctl.waiting == 1)  # its first step is parked
    handle: list[int] = []

    async def attach() -> None:
        handle.append(await engine.load_adapter(mid, _adapter(tmp_path, "late")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(attach)
        # The change waits behind the request.
        await wait_for(lambda: engine.model_info(mid).pending_changes == 1)
        release(ctl, 100)
        tokens = [ev.token_id async for ev in running if isinstance(ev, Token)]
    # The request admitted before the change ran entirely with the old adapter set.
    assert tuple(tokens) == base.token_ids
    assert handle and engine.list_adapters(mid)[0].handle == handle[0]


async def test_a_stub_model_remembers_a_bounded_history_of_steps(engine: erllama.Engine) -> None:
    # It kept every step: about 263 KiB per 3,000-token request, for as long as it served.
    from erllama.backends.stub import HISTORY_STEPS, StubControl

    assert StubControl().history.maxlen == HISTORY_STEPS
    control = StubControl(history_limit=16)
    mid = await engine.load_model("bounded", stub_config(control=control, eog_every=0))
    await engine.complete(mid, "hello", max_tokens=100)
    assert control.steps > 100 and len(control.history) == 16
