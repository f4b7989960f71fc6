"""``erllama serve --ray`` as a user runs it: a real process joining the session's Ray
instance (``RAY_ADDRESS``), serving the routes through Serve's proxy, and removing its own
application on SIGTERM; and the options that only make sense with ``--ray``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..test_cli_serve import Serving
from .cluster import wait_until

CONFIG = """
[cache]
enabled = false

[models.echo]
backend = "stub"
n_ctx = 256
options = { script = "kabo rite" }
"""


def test_replicas_and_router_need_ray() -> None:
    for option in (["--replicas", "2"], ["--router", "erllama"]):
        done = subprocess.run(
            [sys.executable, "-m", "erllama.cli", "serve", *option],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "only with --ray" in done.stderr


@pytest.mark.ray
def test_serve_ray_joins_a_cluster_serves_and_leaves(ray_serve: Any, tmp_path: Path) -> None:
    import ray
    from ray import serve

    config = tmp_path / "serve.toml"
    config.write_text(CONFIG)
    env = {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    os.environ.update(env)  # Serving copies this process's environment
    proc = Serving("--ray", "--replicas", "1", "--config", str(config))
    try:
        # Serve already runs here, so it serves on the session's proxy, and says so.
        started = b"serving on the cluster's Serve"
        wait_until(lambda: started in proc.err or proc.proc.poll() is not None, within=120)
        assert started in proc.err, bytes(proc.err).decode()
        r = httpx.post(
            f"{ray_serve.base_url}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == " kabo rite"
    finally:
        assert proc.stop() == 0
    wait_until(lambda: "erllama" not in serve.status().applications, what="the app leaving")
