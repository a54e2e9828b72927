#!/usr/bin/env bash
# The main job on the embedded default model, headless: see bench/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m lowbit.bench.demo "$@"
