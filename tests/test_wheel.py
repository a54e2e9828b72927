"""The wheel a user or front end installs: built from a copy of the tracked files, installed into an empty folder
and used from there with no repository on sys.path (ComfyUI is added for the node modules, which need it)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from safetensors.torch import save_file

from helpers.comfy_env import comfy_root, repo_root, require_comfy


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Folder holding the installed `lowbit` package (from the wheel only)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is needed to build the wheel (scripts/setup.sh's venv has it)")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    tracked = subprocess.run(["git", "-C", str(repo_root()), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (repo_root() / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root() / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("lowbit-*.whl"))
    site = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, site


def run_installed(site, code_or_args, cwd):
    """Python with the installed folder first on sys.path (the repo's dev .pth entry comes after it) and
    ComfyUI appended."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(comfy_root())]))
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_wheel_holds_every_package(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = {os.path.dirname(n) for n in names if n.endswith("/__init__.py")}
    in_repo = {("lowbit/" + str(p.parent.relative_to(repo_root()))).rstrip("/.")
               for p in repo_root().rglob("__init__.py")
               if not any(part.startswith(".") or part == "tests" for part in p.relative_to(repo_root()).parts)}
    assert packages == in_repo
    assert "lowbit/testbed/weights/testbed.safetensors" in names
    assert any(n.startswith("lowbit/workflows/") and n.endswith(".json") for n in names)


def test_every_module_imports_from_the_wheel(installed, tmp_path):
    require_comfy()
    _, site = installed
    code = """
import importlib, pkgutil, sys, torch, lowbit
import comfy.cli_args
comfy.cli_args.args.cpu = not torch.cuda.is_available()  # before comfy.model_management picks a device
assert lowbit.__file__.startswith(sys.argv[1] if len(sys.argv) > 1 else %r), lowbit.__file__
names = [m.name for m in pkgutil.walk_packages(lowbit.__path__, "lowbit.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
""" % str(site)
    proc = run_installed(site, code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 40


def test_cli_info_from_the_wheel(installed, tmp_path):
    require_comfy()
    from helpers.fixtures import tiny_sdxl_unet
    _, site = installed
    unet = tmp_path / "tiny.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_sdxl_unet(0).state_dict().items()}, str(unet))
    out = tmp_path / "tiny_w4.safetensors"
    proc = run_installed(site, ["-m", "lowbit", "quantize", "--bits", "4", "--group-size", "64", str(unet), str(out)],
                         tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = run_installed(site, ["-m", "lowbit", "info", str(out)], tmp_path)
    assert info.returncode == 0, info.stderr[-3000:]
    header = json.loads(info.stdout)
    assert header["method"] == "rtn" and header["quantized_layers"] == 181
