"""Shared pytest fixtures for LowBit.

Light on import: ComfyUI is only imported (in-process, CPU mode) by fixtures
that need it, through ``helpers.comfy_env.import_comfy()``.  No global seeds
are set here; every fixture seeds itself.

Fixtures:
  comfy_env    (session) -> the ``comfy`` package, imported in CPU mode
  sdxl_ckpt    (session) -> Path of the cached random full-size SDXL checkpoint
  sd15_unet    (session) -> Path of the cached random full-size SD1.5 UNet
  comfy_server (session) -> running ``helpers.comfy_server.ComfyServer``
  tiny_unet    (function) -> fresh ``tiny_sdxl_unet(seed=0)``
  timings      (session) -> dict; entries are printed in the terminal summary
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
import time

import pytest

from helpers import comfy_env

_TIMINGS_KEY = pytest.StashKey[dict]()


IN_PROCESS_SDXL_LAST = ("test_rtn_e2e.py", "test_sdxl_lora.py")


def pytest_collection_modifyitems(session, config, items):
    """Modules that load full SDXL in the test process run last, in this order (the RTN end-to-end module after
    its own server tests), so no later server test needs the memory (an SDXL in each process does not fit 24 GB)."""
    def rank(item):
        name = item.path.name
        return IN_PROCESS_SDXL_LAST.index(name) + 1 if name in IN_PROCESS_SDXL_LAST else 0
    items.sort(key=rank)


def pytest_configure(config):
    # also declared in pytest.ini; repeated so the markers exist with any ini file
    for line in (
        "comfy_server: needs the real ComfyUI server",
        "slow: slow test (full-size models)",
        "browser: drives the ComfyUI web frontend in a browser",
    ):
        config.addinivalue_line("markers", line)
    config.stash[_TIMINGS_KEY] = {}


@pytest.fixture(scope="session")
def timings(pytestconfig) -> dict:
    """name -> seconds; printed at the end of the run."""
    return pytestconfig.stash[_TIMINGS_KEY]


@pytest.fixture(scope="session")
def comfy_env_module():
    comfy_env.require_comfy()
    return comfy_env.import_comfy()


@pytest.fixture(scope="session")
def sdxl_ckpt(timings):
    comfy_env.require_comfy()
    from helpers import fixtures

    t0 = time.perf_counter()
    # build (if missing) in a child process: the ~9 GB the build touches is returned to the OS instead of
    # staying in this process, which later holds an in-process SDXL next to the server's
    subprocess.run([sys.executable, "-c", "from helpers.fixtures import sdxl_random_checkpoint as f; f()"],
                   cwd=Path(__file__).resolve().parent, check=True)
    path = fixtures.sdxl_random_checkpoint()
    timings["sdxl_ckpt (child process)"] = time.perf_counter() - t0
    return path


@pytest.fixture(scope="session")
def sd15_unet(timings):
    comfy_env.require_comfy()
    from helpers import fixtures

    t0 = time.perf_counter()
    path = fixtures.sd15_random_unet_file()
    built = fixtures.build_times.get(path.name)
    timings["sd15_unet build" if built else "sd15_unet (cached)"] = built or time.perf_counter() - t0
    return path


@pytest.fixture(scope="session")
def comfy_server(sdxl_ckpt, timings):
    comfy_env.require_comfy()
    from helpers.comfy_server import ComfyServer

    extra = os.environ.get("LOWBIT_COMFY_ARGS", "").split()
    server = ComfyServer(checkpoint=sdxl_ckpt, extra_args=extra)
    server.start(timeout=float(os.environ.get("LOWBIT_COMFY_START_TIMEOUT", "180")))
    timings["comfy_server startup"] = server.startup_seconds
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tiny_unet():
    comfy_env.require_comfy()
    from helpers.fixtures import tiny_sdxl_unet

    return tiny_sdxl_unet(seed=0)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    t = config.stash.get(_TIMINGS_KEY, None)
    if t:
        terminalreporter.section("lowbit timings")
        for k, v in t.items():
            terminalreporter.write_line(f"{k:40s} {v:8.1f} s")
