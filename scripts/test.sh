#!/usr/bin/env bash
# The whole check: set up, lint (ruff), format check, types (mypy on src), and every test
# (stub tests on asyncio and trio, real-model tests on SmolLM2). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check src tests bench plugins
.venv/bin/ruff format --check src tests bench plugins
echo "== mypy"
.venv/bin/mypy src
echo "== pytest"
# Derandomized hypothesis examples, as many as CI runs (tests/conftest.py has the profiles).
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
.venv/bin/python -m pytest "$@"
