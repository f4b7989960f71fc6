"""``erllama serve`` as a user runs it: a real process on a free loopback port, on asyncio
and trio, stopped by SIGTERM; and a bad config file, named without a traceback.

The models are stub models named in a TOML config (the stub backend is registered by entry
point like any plugin), so these tests load no weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

LOOPS = ["asyncio", "trio"]
CONFIG = """
[server]
port = 0
api_keys = ["sk-cli-test-key"]

[cache]
enabled = false

[models.echo]
backend = "stub"
n_ctx = 256
options = { script = "kabo rite" }
"""


class Serving:
    """``erllama serve`` in a subprocess; stderr collected as it arrives."""

    def __init__(self, *argv: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "erllama.cli", "serve", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.err = bytearray()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(4096):  # type: ignore[attr-defined]
            self.err.extend(chunk)

    def url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", self.err)
            if found:
                return found.group(1).decode()
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"the server did not start: {bytes(self.err).decode()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=30)
        self._drain.join(timeout=10)
        return status


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize("loop", LOOPS)
def test_serve_answers_on_loopback_and_stops_on_sigterm(loop: str, config_file: Path) -> None:
    server = Serving("--config", str(config_file), "--loop", loop)
    try:
        url = server.url()
        with httpx.Client(base_url=url, timeout=30) as h:
            assert h.get("/health").json() == {"status": "ok"}
            assert h.get("/v1/models").status_code == 401  # the config's key is required
            auth = {"authorization": "Bearer sk-cli-test-key"}
            models = h.get("/v1/models", headers=auth).json()
            assert [m["id"] for m in models["data"]] == ["echo"]
            r = h.post(
                "/v1/chat/completions",
                headers=auth,
                json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.json()["choices"][0]["message"]["content"] == " kabo rite"
    finally:
        status = server.stop()
    err = bytes(server.err).decode()
    assert status == 0, err
    assert "Traceback" not in err and "SIGTERM, stopping" in err
    # An access line per request (--log-level info, the default), 401s included.
    access = [line for line in err.splitlines() if "erllama.server.access" in line]
    assert any('"GET /v1/models" 401' in line for line in access), err
    assert any('"POST /v1/chat/completions" 200' in line for line in access), err


def test_the_api_key_can_come_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERLLAMA_API_KEY", "sk-from-the-environment")
    server = Serving("--config", str(config_file), "--port", "0")
    try:
        url = server.url()
        with httpx.Client(base_url=url, timeout=30) as h:
            r = h.get("/v1/models", headers={"x-api-key": "sk-from-the-environment"})
        assert r.status_code == 200
    finally:
        assert server.stop() == 0


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "erllama.cli", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_config_file_names_every_bad_key_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = 99999\ncolour = "red"\n[models.m]\nn_ctxx = 5\n')
    proc = _run("--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for key in ("server.port", "server.colour", "models.m.n_ctxx"):
        assert key in proc.stderr


def test_an_unknown_backend_in_the_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = 0\n[models.m]\nbackend = "nope"\n')
    proc = _run("--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown backend 'nope'" in proc.stderr


LAZY = """
preload = ["echo"]
max_loaded_models = 1

[server]
port = 0

[cache]
enabled = false

[models.echo]
backend = "stub"
n_ctx = 256
options = { script = "kabo rite" }

[models.later]
backend = "stub"
n_ctx = 256
keep_alive_s = 300
options = { script = "sanu mila" }
"""


def test_models_not_preloaded_load_on_their_first_request(tmp_path: Path) -> None:
    path = tmp_path / "lazy.toml"
    path.write_text(LAZY)
    server = Serving("--config", str(path))
    try:
        url = server.url()
        with httpx.Client(base_url=url, timeout=30) as h:
            listed = {m["id"]: m["status"]["value"] for m in h.get("/v1/models").json()["data"]}
            assert listed == {"echo": "loaded", "later": "unloaded"}
            r = h.post(
                "/v1/chat/completions",
                json={"model": "later", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.json()["choices"][0]["message"]["content"] == " sanu mila"
            models = {m["id"]: m for m in h.get("/v1/models").json()["data"]}
            assert models["echo"]["status"]["value"] == "unloaded"  # max_loaded_models = 1
            assert models["later"]["erllama"]["keep_alive_s"] == 300
            assert models["later"]["erllama"]["expires_at"] is not None
    finally:
        assert server.stop() == 0
    assert "loading models (echo; on first request: later)" in bytes(server.err).decode()


def test_a_preload_of_an_unknown_model_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('preload = ["nope"]\n[server]\nport = 0\n[models.m]\nbackend = "stub"\n')
    proc = _run("--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "preload" in proc.stderr


def test_a_port_in_use_is_one_line_and_exit_2_before_any_model_loads(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "serve.toml"
        # The port is checked first: no "loading models" line, nothing loaded.
        path.write_text(f'[server]\nport = {port}\n[models.m]\nbackend = "stub"\n')
        proc = _run("--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"erllama serve: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


def test_parallel_and_default_model_options(tmp_path: Path) -> None:
    from erllama.cli._parser import PARALLEL, build_parser
    from erllama.cli._serve import serve_config

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    parser = build_parser()
    given = serve_config(
        parser.parse_args(
            ["serve", "--model", str(model), "--parallel", "2", "--default-model", "m"]
        )
    )
    default = serve_config(parser.parse_args(["serve", "--model", str(model)]))
    assert given.models["m"].n_seq_max == 2 and given.server.default_model == "m"
    assert default.models["m"].n_seq_max == PARALLEL and default.server.default_model is None
    config = tmp_path / "x.toml"
    config.write_text("[server]\nport = 0\n")
    proc = _run("--config", str(config), "--parallel", "2")  # n_seq_max belongs in the file
    assert proc.returncode == 2 and "--parallel: set the model in the --config file" in proc.stderr


def test_kv_cache_type_options(tmp_path: Path) -> None:
    from erllama.cli._parser import build_parser
    from erllama.cli._serve import serve_config

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    parser = build_parser()
    q8 = serve_config(parser.parse_args(["serve", "--model", str(model), "-ctk", "q8_0",
                                         "--cache-type-v", "q8_0"]))  # fmt: skip
    default = serve_config(parser.parse_args(["serve", "--model", str(model)]))
    assert (q8.models["m"].type_k, q8.models["m"].type_v) == ("q8_0", "q8_0")
    assert (default.models["m"].type_k, default.models["m"].type_v) == ("f16", "f16")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cache-type-k", "q9"])
    config = tmp_path / "x.toml"
    config.write_text("[server]\nport = 0\n")
    proc = _run("--config", str(config), "-ctk", "q8_0")  # type_k belongs in the file
    assert proc.returncode == 2 and "--cache-type-k: set the model in the --config" in proc.stderr


def test_log_level_warning_drops_the_access_lines(config_file: Path) -> None:
    server = Serving("--config", str(config_file), "--log-level", "warning")
    try:
        with httpx.Client(base_url=server.url(), timeout=30) as h:
            assert h.get("/health").status_code == 200
    finally:
        assert server.stop() == 0
    assert "erllama.server.access" not in bytes(server.err).decode()
