#!/usr/bin/env bash
# Set up, then run the cold-vs-warm demo on the bundled SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/erllama demo "$@"
