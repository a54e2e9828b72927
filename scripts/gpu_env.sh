#!/usr/bin/env bash
# Developer tool (not run by CI): a local venv, .venv-gpu/, mirroring the Python packages of the lent GPU
# machine (nvidia-h200, image 'cuda'), so that import errors and missing packages show up on this CPU
# machine instead of on the scarce GPU one.  Then runs the command given as arguments inside it:
#
#   bash scripts/gpu_env.sh python -m lowbit bench gpu --dry-run --out /tmp/x
#   bash scripts/gpu_env.sh python -m lowbit bench kernels --check
#   bash scripts/gpu_env.sh python -m pytest tests/test_kernels.py
#   bash scripts/gpu_env.sh            # only build / check the env
#
# The GPU machine (no network there; only pure-Python wheels we carry can be added) has Python 3.12.3 and
# torch 2.11.0+cu130, triton 3.6.0, numpy 2.5.2, safetensors 0.8.0, transformers 5.17.0, tokenizers 0.23.2,
# sentencepiece 0.2.2, huggingface_hub 1.33.0, accelerate 1.15.0, torchvision 0.26.0, torchaudio 2.11.0
# (source: /work/.library/device/KINDS.md).  Those are pinned below; the few other packages that lowbit,
# its tests or ComfyUI import are installed unpinned, and only if they are in the machine's package list
# (GPU_HAS below).  ComfyUI's own requirements are NOT installed: whatever of them is absent there
# (torchsde, kornia, spandrel, av, alembic, sqlalchemy, comfyui-frontend-package, ...) is absent here too.
#
# Python: 3.12 (pyenv's 3.12.x here; override with LOWBIT_GPU_PYTHON=/path/to/python3.12).  Without a
# 3.12 it falls back to `python3` (3.11 on these machines) with a warning; the mirror is then weaker.
# torch 2.11.0 from PyPI is the CUDA 13 build (~5 GB with its nvidia-* wheels); it runs on CPU.  It can
# NOT be installed --no-deps: `import torch` then fails on libcudnn.so.9.
#
# `import lowbit` works from anywhere in the env (.venv-gpu/lowbit-src/lowbit -> repo root, on a .pth),
# as scripts/setup.sh does for .venv.  ComfyUI is the git-ignored .comfyui/ that scripts/setup.sh fetches;
# it is NOT put on sys.path (the repo's own import_comfy() appends it and forces CPU mode, as on the GPU
# machine); LOWBIT_COMFYUI is exported pointing at it.  Idempotent: a stamp file holds this script's hash;
# when the script changes, the env is rebuilt from scratch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-gpu"
PY="$VENV/bin/python"
STAMP="$VENV/.lowbit-gpu-env-done"
WANT="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
log() { echo "[gpu_env] $*" >&2; }

PINNED=(
  torch==2.11.0 triton==3.6.0 torchvision==0.26.0 torchaudio==2.11.0
  numpy==2.5.2 safetensors==0.8.0 transformers==5.17.0 tokenizers==0.23.2 sentencepiece==0.2.2
  huggingface_hub==1.33.0 accelerate==1.15.0
  # transformers needs typer; typer>=0.29 needs pydantic, which the GPU machine does not have.
  "typer<0.29"
)
# Imported by lowbit, its tests or ComfyUI's core and present on the GPU machine (versions unknown there).
UNPINNED=(pytest pytest-timeout einops pillow pyyaml scipy tqdm psutil aiohttp yarl)
# "Python packages already there" on the GPU machine (KINDS.md, read 2026-11-17), names only.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

pick_python() {
  local c
  for c in "${LOWBIT_GPU_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
    [ -n "$c" ] || continue
    # pyenv shims exist for versions that are installed but not selected: check the interpreter runs.
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      "$c" -c 'import sys; print(sys.executable)'; return
    fi
  done
  log "WARNING: no Python 3.12 found (GPU machine: 3.12.3); falling back to $(python3 -V 2>&1)"
  python3 -c 'import sys; print(sys.executable)'
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$PY" ]; then
  log "env up to date: $VENV ($("$PY" -V 2>&1))"
else
  BASE="$(pick_python)"
  start=$SECONDS
  # Always from scratch, so nothing a former package list left behind stays (pip's cache keeps it quick).
  if [ -e "$VENV" ]; then log "removing stale $VENV"; rm -rf "$VENV"; fi
  log "creating $VENV with $BASE ($("$BASE" -V 2>&1))"
  "$BASE" -m venv "$VENV"
  log "installing (pinned): ${PINNED[*]}"
  log "installing (unpinned): ${UNPINNED[*]}"
  # One resolve, so nothing later replaces a pinned version.  torch's CUDA wheels make this ~5 GB.
  # (the grep only drops this machine's pip-config noise about missing local index folders)
  rc=0
  "$PY" -m pip install -q --disable-pip-version-check "${PINNED[@]}" "${UNPINNED[@]}" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; } || rc=$?
  [ "$rc" = 0 ] || { log "ERROR: pip install failed ($rc)"; exit 1; }
  "$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2; log "ERROR: pip check failed"; exit 1; }
  for p in "${PINNED[@]}"; do
    [[ "$p" == *==* ]] || continue
    name="${p%%==*}"; want="${p#*==}"
    have="$("$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)"
    [ "$have" = "$want" ] || { log "ERROR: $name is '$have', want $want"; exit 1; }
  done
  # Anything installed (as a dependency) that the GPU machine lacks would hide a missing-package error there.
  extra="$("$PY" - "$GPU_HAS" <<'PYEOF'
import sys, re, importlib.metadata as m
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
has = {norm(n) for n in sys.argv[1].split()}
names = sorted({norm(d.metadata["Name"]) for d in m.distributions()})
print(" ".join(n for n in names if n not in has))
PYEOF
)"
  if [ -n "$extra" ]; then
    log "WARNING: installed here but NOT on the GPU machine (dependencies pulled in; an import of these"
    log "         that works here fails there): $extra"
  fi
  # `import lowbit` from anywhere in the env.
  mkdir -p "$VENV/lowbit-src"
  ln -sfn "$ROOT" "$VENV/lowbit-src/lowbit"
  sp="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$VENV/lowbit-src" > "$sp/lowbit-dev.pth"
  echo "$WANT" > "$STAMP"
  log "built in $((SECONDS - start)) s: $("$PY" -V 2>&1), $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)"
fi

if [ -f "$ROOT/.comfyui/main.py" ]; then
  export LOWBIT_COMFYUI="${LOWBIT_COMFYUI:-$ROOT/.comfyui}"
else
  log "WARNING: $ROOT/.comfyui/main.py missing: run 'bash scripts/setup.sh' first for ComfyUI 0.3.75"
fi
[ "$#" -gt 0 ] || exit 0
log "running in $VENV: $*"
# scripts/gpu_env_site/sitecustomize.py: Triton 3.6's interpreter with numpy >= 2.4 (CPU dry runs only)
export PYTHONPATH="$ROOT/scripts/gpu_env_site${PYTHONPATH:+:$PYTHONPATH}"
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
unset PYTHONHOME
exec "$@"
