"""The ``erllama`` command: options, argument checks, output, Ctrl-C in chat, cache places.

Argument checks run in-process (nothing may load); the rest runs the real command on the
bundled SmolLM2 in a subprocess, with a small context and few tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import erllama
from erllama import cli
from erllama.bundled import bundled_model_path
from erllama.cli._chat import chat_cache_config
from erllama.cli._parser import build_parser

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--n-ctx", "512"]
LOOPS = ["asyncio", "trio"]


# ---- options and help -------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"erllama {erllama.__version__}\n"


def test_every_option_and_command_has_help_and_descriptions_are_plain_text() -> None:
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{parser.prog} {choice.dest} has no help"
            else:
                assert action.help, f"{parser.prog} {'/'.join(action.option_strings)}"
        text = (parser.description or "") + parser.format_help()
        for markup in ("``", ":class:", ":func:", "**", "](", "`"):
            assert markup not in text, f"{parser.prog} help has {markup!r}"


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command would start (and load a model)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a command ran although its arguments were bad")

    monkeypatch.setattr(cli.anyio, "run", refuse)


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["complete", "--max-tokens", "-3", "x"], "--max-tokens: must be >= 1, got -3"),
        (["complete", "--max-tokens", "0", "x"], "--max-tokens"),
        (["complete", "--max-tokens", "many", "x"], "--max-tokens: expected an integer"),
        (["complete", "--temperature", "-0.5", "x"], "--temperature: must be >= 0"),
        (["complete", "--temperature", "hot", "x"], "--temperature: expected a number"),
        (["chat", "--temperature", "nan"], "--temperature"),
        (["complete", "--top-p", "0", "x"], "--top-p: must be in (0, 1]"),
        (["complete", "--top-p", "1.5", "x"], "--top-p"),
        (["complete", "--top-k", "-1", "x"], "--top-k"),
        (["complete", "--seed", "-1", "x"], "--seed"),
        (["complete", "--n-ctx", "4", "x"], "--n-ctx"),
        (["info", "--threads", "0"], "--threads"),
        (["info", "--gpu-layers", "-2"], "--gpu-layers"),
        (["info", "--loop", "curio"], "--loop"),
        (["demo", "--turns", "9"], "--turns: must be between 1 and 4"),
        (["complete", ""], "the prompt is empty"),
        (["complete", "--model", "{tmp}/missing.gguf", "x"], "--model: no such file"),
        (["info", "--model", "{tmp}"], "is a directory, not a GGUF file"),
        (["chat", "--cache-dir", "{tmp}/file"], "--cache-dir: "),
        (["complete"], "required: PROMPT"),
        ([], "required: COMMAND"),
        (["serve", "--port", "70000"], "--port: must be between 0 and 65535"),
        (["serve", "--config", "{tmp}/missing.toml"], "--config: no such file"),
        (["serve", "--config", "{tmp}/file", "--n-ctx", "512"], "--n-ctx: set the model in"),
        (["serve", "--max-tokens", "0"], "--max-tokens"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2_before_anything_loads(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert captured.err.startswith("erllama") and says in captured.err


def test_a_bad_model_path_exits_2_without_a_traceback(tmp_path: Path) -> None:
    # The real process: exit status, and nothing on stderr but the one line.
    proc = _run(["info", "--model", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "is a directory" in proc.stderr


# ---- where the chat's cache lives ---------------------------------------------------------


def test_chat_without_cache_dir_keeps_its_cache_in_memory_only() -> None:
    # Nothing is written anywhere: no /dev/shm tier, no disk tier.
    cache = chat_cache_config(None)
    assert cache.enabled and cache.ram_bytes > 0
    assert cache.ram_file_dir is None and cache.disk_dir is None


def test_chat_with_cache_dir_keeps_rows_there_only(tmp_path: Path) -> None:
    # RAM rows spill one tier down when the chat ends: to the directory, never to /dev/shm.
    cache = chat_cache_config(tmp_path)
    assert cache.disk_dir == tmp_path and cache.ram_file_dir is None


def test_chat_help_says_where_the_cache_lives() -> None:
    (chat,) = [p for p in _parsers(build_parser()) if p.prog == "erllama chat"]
    text = " ".join(chat.format_help().split())
    assert "keep the KV cache in DIR" in text
    assert "without it the cache lives in memory and is gone when the chat ends" in text


# ---- erllama bench --quick --------------------------------------------------------------


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "bench" / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_runs_never_write_over_the_committed_results(tmp_path: Path) -> None:
    harness = _harness()
    results = REPO / "bench" / "results"
    assert harness.results_dir(None, quick=False) == results
    assert harness.results_dir(None, quick=True) == results / "quick"
    assert harness.results_dir(tmp_path, quick=True) == tmp_path
    # The committed files are directly in bench/results/; git ignores everything below it.
    assert (results / "latest.json").is_file()
    assert "--quick" in harness.parser().format_help()


# ---- the real command on SmolLM2 ----------------------------------------------------------


def _env() -> dict[str, str]:
    # Unbuffered, so a subprocess test sees each token as it is written.
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(
    argv: list[str], stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "erllama.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


@pytest.fixture(scope="module")
def smol() -> Path:
    path = bundled_model_path()
    if path is None:
        pytest.fail("SmolLM2 is not installed; run scripts/setup.sh")
    return path


def _ends_lines(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in (proc.stdout, proc.stderr):
        assert not text or text.endswith("\n"), repr(text[-80:])


@pytest.mark.real_model
@pytest.mark.usefixtures("smol")
@pytest.mark.parametrize(
    "argv",
    [
        ["complete", *SMALL, "--max-tokens", "4", "The capital of France is"],
        ["info", *SMALL],
        ["demo", "--n-ctx", "1024", "--turns", "1", "--max-tokens", "2"],
        ["--version"],
    ],
    ids=["complete", "info", "demo", "version"],
)
def test_every_command_ends_its_output_with_a_newline(argv: list[str]) -> None:
    proc = _run(argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout
    _ends_lines(proc)


@pytest.mark.real_model
@pytest.mark.usefixtures("smol")
def test_a_chat_with_cache_dir_leaves_rows_there_and_the_next_chat_starts_warm(
    tmp_path: Path,
) -> None:
    # A system prompt long enough for a cold save (CachePolicy.cold_min_tokens is 128).
    system = "You answer questions about rivers, briefly and exactly. " * 16
    argv = ["chat", *SMALL, "--max-tokens", "4", "--system", system, "--cache-dir", str(tmp_path)]
    first = _run(argv, stdin="Name a river.\n")
    assert first.returncode == 0, first.stderr
    _ends_lines(first)
    assert "cache cold" in first.stderr
    assert any(tmp_path.rglob("*")), "nothing was saved in --cache-dir"
    second = _run(argv, stdin="Name a river.\n")
    assert second.returncode == 0, second.stderr
    assert "cache partial" in second.stderr or "cache exact" in second.stderr, second.stderr


class _Chat:
    """``erllama chat`` in a subprocess, its output collected as it arrives."""

    def __init__(self, loop: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "erllama.cli", "chat", *SMALL, "--loop", loop, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        self.out = bytearray()
        self.err = bytearray()
        self._drains = [
            threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
            for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._drains:
            t.start()

    @staticmethod
    def _drain(pipe: Any, buf: bytearray) -> None:
        while chunk := pipe.read1(4096):
            buf.extend(chunk)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"waiting for {what}: out={self.out!r} err={self.err!r}")
            time.sleep(0.01)

    def prompts(self) -> int:
        return self.err.count(b"> ")

    def at_prompt(self, n: int) -> None:
        self.wait_for(f"prompt {n}", lambda: self.prompts() >= n and self.err.endswith(b"> "))

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def exit_status(self) -> int:
        status = self.proc.wait(timeout=30)
        for t in self._drains:  # the pipes are at end of file: the last bytes are read
            t.join(timeout=10)
        err = bytes(self.err).decode()
        assert "Traceback" not in err, err
        assert err.endswith("\n") and (not self.out or self.out.endswith(b"\n"))
        return status


@pytest.mark.real_model
@pytest.mark.usefixtures("smol")
@pytest.mark.parametrize("loop", LOOPS)
def test_chat_ctrl_c_at_the_prompt_exits_130_at_once(loop: str) -> None:
    chat = _Chat(loop)
    chat.at_prompt(1)
    chat.interrupt()
    assert chat.exit_status() == 130


@pytest.mark.real_model
@pytest.mark.usefixtures("smol")
@pytest.mark.parametrize("loop", LOOPS)
def test_chat_ctrl_c_during_a_reply_stops_it_and_returns_to_the_prompt(loop: str) -> None:
    chat = _Chat(loop, "--max-tokens", "200")
    chat.at_prompt(1)
    chat.say("Write a long story about a dragon who learns to fly.")
    chat.wait_for("the reply's first token", lambda: len(chat.out) > 0)
    chat.interrupt()
    chat.at_prompt(2)
    assert b"[reply stopped]" in chat.err
    # The chat goes on: the next question gets a whole reply ...
    chat.say("Hi")
    chat.at_prompt(3)
    assert b"[ttft" in chat.err
    # ... and a Ctrl-C at the prompt ends it.
    chat.interrupt()
    assert chat.exit_status() == 130


@pytest.mark.real_model
@pytest.mark.usefixtures("smol")
def test_chat_ends_at_end_of_input_with_status_0() -> None:
    proc = _run(["chat", *SMALL, "--max-tokens", "4"], stdin="Hi\n")
    assert proc.returncode == 0, proc.stderr
    assert "[ttft" in proc.stderr
    _ends_lines(proc)
