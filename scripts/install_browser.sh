#!/usr/bin/env bash
# Idempotent: what the browser test tier (tests/test_browser.py, `pytest -m browser`) needs.
#   * Debian's chromium at /usr/bin/chromium (apt; only if it is missing; needs root or password-less sudo)
#   * the pinned Python `playwright` in .venv (it drives the system chromium; no browser is ever downloaded:
#     never run `playwright install`)
# Exits non-zero when something could not be installed; scripts/setup.sh calls it guarded, and the
# browser tests then skip locally with the reason (in CI they fail instead: see tests/helpers/browser.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
PLAYWRIGHT_VERSION="1.65.2"
CHROMIUM="${LOWBIT_CHROMIUM:-/usr/bin/chromium}"

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = "0" ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "[install_browser] $CHROMIUM is missing and apt-get needs root: run 'apt-get install chromium' as root" >&2
    exit 1
  fi
  echo "[install_browser] installing Debian's chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q >/dev/null
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
"$CHROMIUM" --version 2>/dev/null

if ! "$PY" - "$PLAYWRIGHT_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("playwright") == sys.argv[1] else 1)
PYEOF
then
  echo "[install_browser] installing playwright==$PLAYWRIGHT_VERSION into .venv"
  "$PY" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi
echo "[install_browser] playwright $("$PY" -c 'from importlib.metadata import version; print(version("playwright"))') ready"
