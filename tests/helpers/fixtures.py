"""Deterministic model fixtures (no downloads).

* ``tiny_sdxl_unet`` / ``tiny_unet_inputs``: a ComfyUI ``UNetModel`` with the
  SDXL block structure at tiny width, for fast in-process tests.
* ``sdxl_random_checkpoint``: a full-size, randomly initialised SDXL
  checkpoint (UNet + CLIP-L + CLIP-G + VAE, fp16, standard key layout) that
  stock ComfyUI loads with ``CheckpointLoaderSimple``; shipped code
  (``bench/sdxl_random.py``, which `bench lowvram` uses on a GPU), imported
  from there with its deterministic init and file cache.
* ``sd15_random_unet_file``: a full-size random SD1.5 UNet (``model.diffusion_model.*``).

The big files are cached under ``<repo>/.cache/fixtures`` (override with
``LOWBIT_FIXTURE_CACHE``), built once under a file lock and written atomically.
Big models are built on the ``meta`` device and materialised one module at a
time (fp32 init -> fp16 copy), so peak RAM stays ~ the fp16 file size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.bench.comfy_server import apply_overrides, load_api_workflow  # noqa: F401
from lowbit.bench.sdxl_random import (COMMON_UNET_CONFIG, FIXTURE_VERSION, SDXL_UNET_CONFIG,  # noqa: F401
                                      SDXL_UNET_PARAMS, SDXL_VAE_DDCONFIG, build_times, cache_dir, cached,
                                      deterministic_init_, fixture_metadata, materialize_state_dict,
                                      sdxl_random_checkpoint, unet_state_dict)

from .comfy_env import import_comfy

# --------------------------------------------------------------------------
# UNet configs (kwargs of comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel,
# without dtype/device/operations).  Same keys ComfyUI's model_detection emits
# plus the supported_models unet_extra_config (num_heads/num_head_channels).
# --------------------------------------------------------------------------
# (SDXL_UNET_CONFIG: bench/sdxl_random.py)
_COMMON = COMMON_UNET_CONFIG

SD15_UNET_CONFIG = {
    **_COMMON,
    "adm_in_channels": None,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "num_heads": 8,
    "num_head_channels": -1,
}

# SDXL structure, tiny width.  Every Linear/Conv2d dim is a multiple of 8
# except -- exactly as in real SDXL -- conv_in's 4 input channels
# (input_blocks.0.0) and the final conv's 4 output channels (out.2).
TINY_SDXL_UNET_CONFIG = {
    **_COMMON,
    "num_classes": "sequential",
    "adm_in_channels": 96,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 64,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "num_heads": -1,
    "num_head_channels": 16,
}
TINY_CONTEXT_TOKENS = 8


# --------------------------------------------------------------------------
# tiny UNet
# --------------------------------------------------------------------------
def tiny_sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """ComfyUI UNetModel with SDXL structure at tiny width, deterministic by seed, eval mode."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(**TINY_SDXL_UNET_CONFIG, dtype=dtype, device="cpu",
                      operations=comfy.ops.disable_weight_init)
    model.to(torch.float32)
    deterministic_init_(model, seed)
    model.to(dtype)
    return model.eval().requires_grad_(False)


def tiny_unet_inputs(batch: int = 2, hw: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """dict(x [B,4,hw,hw], timesteps [B], context [B,8,64], y [B,96]) for ``tiny_sdxl_unet``."""
    if hw % 4:
        raise ValueError("hw must be a multiple of 4 (two downsamples)")
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_SDXL_UNET_CONFIG
    return {
        "x": torch.randn(batch, cfg["in_channels"], hw, hw, generator=g).to(dtype),
        "timesteps": (torch.rand(batch, generator=g) * 999.0).to(dtype),
        "context": torch.randn(batch, TINY_CONTEXT_TOKENS, cfg["context_dim"], generator=g).to(dtype),
        "y": torch.randn(batch, cfg["adm_in_channels"], generator=g).to(dtype),
    }


# --------------------------------------------------------------------------
# cached full-size files (cache, SDXL checkpoint: bench/sdxl_random.py)
# --------------------------------------------------------------------------
def _build_sd15_unet(out: Path, seed: int) -> None:
    import_comfy()
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    model_config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
    if type(model_config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects the SD1.5 unet config as {type(model_config).__name__}")
    sd = model_config.process_unet_state_dict_for_saving(unet_state_dict(SD15_UNET_CONFIG, seed))
    comfy.utils.save_torch_file(sd, str(out), metadata=fixture_metadata("sd15_random_unet_fp16", seed))


def sd15_random_unet_file(seed: int = 0) -> Path:
    """Path of the cached random full-size SD1.5 UNet (``model.diffusion_model.*``, fp16, ~1.7 GB)."""
    name = "sd15_random_unet_fp16.safetensors" if seed == 0 else f"sd15_random_unet_fp16_seed{seed}.safetensors"
    return cached(name, "sd15_random_unet_fp16", lambda p: _build_sd15_unet(p, seed))


# --------------------------------------------------------------------------
# API workflows (load_api_workflow / apply_overrides: bench/comfy_server.py)
# --------------------------------------------------------------------------
def sdxl_txt2img_prompt(ckpt_name: str = "sdxl_random.safetensors", steps: int = 2, size: int = 64,
                        seed: int = 0, sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.0,
                        batch: int = 1, filename_prefix: str = "lowbit_test") -> dict:
    """Stock ComfyUI API prompt: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage
    -> KSampler -> VAEDecode -> SaveImage.  Node ids: 4 ckpt, 6/7 pos/neg, 5 latent, 3 sampler,
    8 decode, 9 save (ComfyUI's default-workflow numbering)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": filename_prefix}},
    }


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
