#!/usr/bin/env bash
# Runs the test suite (sets up .venv and .comfyui first if needed). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# -P: the repository root is not put on sys.path, so its top-level folders (kernels/, nodes/) never shadow
# packages of the same name that diffusers/transformers and ComfyUI import
exec .venv/bin/python -P -m pytest "$@"
