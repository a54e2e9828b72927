"""Moved to ``lowbit.bench.comfy_server`` (shipped code never imports the tests); re-exported for old imports."""
from lowbit.bench.comfy_server import *  # noqa: F401,F403
