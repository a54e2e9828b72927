#!/usr/bin/env bash
# Runs the test suite (sets up .venv and .comfyui first if needed). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
