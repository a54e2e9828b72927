"""Test helpers for LowBit (import as ``helpers``; ``tests`` is on pytest's pythonpath).

Nothing here imports ComfyUI at import time; ``comfy_env.import_comfy()`` does.  The ComfyUI server runner and
the API-workflow loader are shipped code (``lowbit.bench.comfy_server``), re-exported here.
"""
from lowbit.bench.comfy_server import (ComfyExecutionError, ComfyInterrupted, ComfyPromptError, ComfyServer,
                                      ComfyServerError, WsCollector, apply_overrides, load_api_workflow)

from .comfy_env import comfy_available, comfy_root, import_comfy, repo_root, venv_python
from .fixtures import (SD15_UNET_CONFIG, SDXL_UNET_CONFIG, SDXL_UNET_PARAMS, TINY_SDXL_UNET_CONFIG,
                       deterministic_init_, sd15_random_unet_file, sdxl_random_checkpoint, sdxl_txt2img_prompt,
                       tiny_sdxl_unet, tiny_unet_inputs)
