"""Locate the test-only ComfyUI checkout and import it in-process.

ComfyUI lives at ``<repo>/.comfyui`` (git-ignored), overridable with the
``LOWBIT_COMFYUI`` environment variable.  It is *appended* to ``sys.path`` so
that nothing in it (it ships top-level ``tests``, ``utils``, ``app`` ...)
shadows our own modules.  ``import_comfy()`` must be called before anything
in-process imports ``comfy.*``; it forces CPU mode before
``comfy.model_management`` is first imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

from lowbit.bench.comfy_server import comfy_root, venv_python  # noqa: F401  (shipped: the bench runs ComfyUI too)

REPO_ROOT = Path(__file__).resolve().parents[2]

_lock = threading.Lock()
_imported = False


def repo_root() -> Path:
    return REPO_ROOT


def comfy_available() -> bool:
    root = comfy_root()
    return (root / "main.py").is_file() and (root / "comfy").is_dir()


def in_ci() -> bool:
    """True when the environment variable CI is set to a truthy value (CI=true, CI=1 ...; not "", 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require_comfy() -> None:
    """Skip the calling test when the ComfyUI checkout is missing; under CI (`in_ci()`) fail it instead, so a
    CI job whose ComfyUI setup broke cannot pass by skipping every ComfyUI test."""
    import pytest
    if not comfy_available():
        msg = f"ComfyUI not found at {comfy_root()} (set LOWBIT_COMFYUI, or run scripts/setup.sh)"
        if in_ci():
            pytest.fail(f"{msg}; CI is set, so the ComfyUI tests must run, not be skipped", pytrace=False)
        pytest.skip(msg)


def import_comfy():
    """Put ComfyUI on sys.path (idempotent), force CPU mode, return ``comfy`` module.

    Raises RuntimeError if ``comfy.model_management`` was already imported
    without CPU mode (the device choice is made at import time).
    """
    global _imported
    with _lock:
        root = str(comfy_root())
        if not comfy_available():
            raise RuntimeError(f"ComfyUI not found at {root} (set LOWBIT_COMFYUI)")
        if root not in sys.path:
            sys.path.append(root)
        if not _imported:
            already = "comfy.model_management" in sys.modules
            import comfy.cli_args

            comfy.cli_args.args.cpu = True
            if already:
                import comfy.model_management as mm

                if mm.cpu_state != mm.CPUState.CPU:
                    raise RuntimeError(
                        "comfy.model_management was imported before import_comfy(); "
                        "it is not in CPU mode"
                    )
            import comfy.model_management  # noqa: F401  (decides the device now)
            import comfy.ops  # noqa: F401

            _imported = True
        import comfy

        return comfy


def comfy_nodes():
    """ComfyUI's nodes.py (stock nodes such as KSampler); imported by path because the repo's own `nodes/`
    package can shadow the name."""
    import_comfy()
    path = comfy_root() / "nodes.py"
    module = sys.modules.get("nodes")
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path.resolve():
        return module
    spec = importlib.util.spec_from_file_location("nodes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    spec.loader.exec_module(module)
    return module
