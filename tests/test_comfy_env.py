"""A missing ComfyUI checkout skips the ComfyUI tests on a developer machine but fails them under CI (`CI` set), so a
CI job whose ComfyUI setup broke cannot go green by skipping them (helpers/comfy_env.require_comfy)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
INNER_TEST = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from helpers.comfy_env import require_comfy


def test_needs_comfy():
    require_comfy()
"""


def _run_inner(tmp_path, ci):
    """pytest on a one-test file calling require_comfy(), in a child process whose LOWBIT_COMFYUI points nowhere
    (and with its own empty ini, so the repository's pytest.ini and conftest are not involved)."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LOWBIT_COMFYUI"] = str(tmp_path / "no_comfyui_here")
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "-c",
                          str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_missing_comfyui_fails_under_ci(tmp_path, ci):
    code, log = _run_inner(tmp_path, ci)
    assert code == pytest.ExitCode.TESTS_FAILED, log
    assert "1 failed" in log and "ComfyUI not found at" in log and "no_comfyui_here" in log, log
    assert "CI is set" in log, log


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_comfyui_skips_outside_ci(tmp_path, ci):
    code, log = _run_inner(tmp_path, ci)
    assert code == pytest.ExitCode.OK, log
    assert "1 skipped" in log and "ComfyUI not found at" in log and "failed" not in log, log
