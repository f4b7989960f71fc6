"""``erllama cache explain``: offline, against the cache directory a server left."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

import erllama
from erllama.backends import stub
from erllama.cli import main

from .helpers import stub_config

A = list(range(300, 340))
B = list(range(500, 520))


def server_config(tmp_path: Path, disk_bytes: int) -> Path:
    """A server's TOML: a stub model and a disk tier (a tiny budget: explaining must not
    trim the directory to it)."""
    path = tmp_path / "serve.toml"
    path.write_text(
        f"""
[cache]
ram_file_dir = "{tmp_path / "no-shm"}"
ram_file_bytes = 0
disk_dir = "{tmp_path / "disk"}"
disk_bytes = {disk_bytes}
policy = {{ min_tokens = 4 }}

[models.m]
backend = "stub"
n_ctx = 512
keep_live_kv = false
"""
    )
    return path


@pytest.fixture
def saved(tmp_path: Path) -> str:
    """A disk tier holding one row of A (what a server left when it stopped); its key."""

    async def fill() -> str:
        registry = erllama.make_backend_registry({"stub": stub}, autoload=False)
        cfg = erllama.EngineConfig(
            cache=erllama.CacheConfig(
                ram_file_dir=None,
                disk_dir=tmp_path / "disk",
                policy=erllama.CachePolicy(min_tokens=4),
            )
        )
        async with erllama.open_engine(cfg, backends=registry) as eng:
            mid = await eng.load_model("m", stub_config(keep_live_kv=False))
            key = await eng.prefill_only(mid, A)
            await eng.wait_saved()
        return key

    return anyio.run(fill)


def rows(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "disk").iterdir())


def test_it_explains_a_diverging_prompt_from_the_directory(
    tmp_path: Path, saved: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows(tmp_path)
    toml = server_config(tmp_path, disk_bytes=1)
    prompt = " ".join(str(t) for t in [*A[:25], *B])
    assert main(["cache", "explain", "--config", str(toml), "--tokens", "--json", prompt]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["cause"] == "diverged"
    assert (ex["position"], ex["matched"], ex["restored"], ex["tier"]) == (25, 25, 25, "disk")
    assert (ex["row_key"], ex["row_tokens"], ex["row_tier"]) == (saved, 40, "disk")
    assert ex["prompt_ids"] == B[:8] and ex["row_ids"] == A[25:33]
    assert rows(tmp_path) == before  # nothing trimmed, nothing saved


def test_its_plain_output_names_the_cause_and_both_sides(
    tmp_path: Path, saved: str, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = server_config(tmp_path, disk_bytes=1 << 30)
    prompt = " ".join(str(t) for t in [*A, *B])
    assert main(["cache", "explain", "--config", str(toml), "--tokens", prompt]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "    cause: extends at token 40: the prompt runs past the end of the nearest row" in out
    assert "restored: 40 tokens from disk (grid 1)" in [line.strip() for line in out]
    assert f"      row: {saved} (40 tokens, disk)" in out


def test_another_keys_rows_are_not_its_own(
    tmp_path: Path, saved: str, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = server_config(tmp_path, disk_bytes=1 << 30)
    prompt = " ".join(str(t) for t in A)
    argv = ["cache", "explain", "--config", str(toml), "--tokens", "--json"]
    assert main([*argv, "--api-key", "sk-someone", prompt]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert (ex["cause"], ex["restored"]) == ("no_row", 0)


def test_an_unknown_model_id_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = server_config(tmp_path, disk_bytes=1 << 30)
    with pytest.raises(SystemExit) as exc:
        main(["cache", "explain", "--config", str(toml), "--model-id", "nope", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-id nope: not in the config (it has m)" in err


def test_without_a_prompt_it_says_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cache", "explain"])
    assert exc.value.code == 2
    assert "give a PROMPT, or --messages FILE" in capsys.readouterr().err
