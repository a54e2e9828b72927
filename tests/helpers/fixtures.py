"""Deterministic model fixtures (no downloads).

* ``tiny_sdxl_unet`` / ``tiny_unet_inputs``: a ComfyUI ``UNetModel`` with the
  SDXL block structure at tiny width, for fast in-process tests.
* ``sdxl_random_checkpoint``: a full-size, randomly initialised SDXL
  checkpoint (UNet + CLIP-L + CLIP-G + VAE, fp16, standard key layout) that
  stock ComfyUI loads with ``CheckpointLoaderSimple``.
* ``sd15_random_unet_file``: a full-size random SD1.5 UNet (``model.diffusion_model.*``).

The big files are cached under ``<repo>/.cache/fixtures`` (override with
``LOWBIT_FIXTURE_CACHE``), built once under a file lock and written atomically.
Big models are built on the ``meta`` device and materialised one module at a
time (fp32 init -> fp16 copy), so peak RAM stays ~ the fp16 file size.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .comfy_env import import_comfy, repo_root

# Bump when the recipe changes: cached files with another version are rebuilt.
FIXTURE_VERSION = "1"

# --------------------------------------------------------------------------
# UNet configs (kwargs of comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel,
# without dtype/device/operations).  Same keys ComfyUI's model_detection emits
# plus the supported_models unet_extra_config (num_heads/num_head_channels).
# --------------------------------------------------------------------------
_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SDXL_UNET_CONFIG = {
    **_COMMON,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "num_heads": -1,
    "num_head_channels": 64,
}

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

# ComfyUI's default SD/SDXL AutoencoderKL ddconfig (comfy/sd.py VAE.__init__).
SDXL_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

SDXL_UNET_PARAMS = 2_567_463_684  # parameter count of the SDXL base UNet


# --------------------------------------------------------------------------
# deterministic init
# --------------------------------------------------------------------------
_SPECIAL_INIT: Dict[str, Callable[[torch.Tensor], None]] = {
    # sd1_clip.SDClipModel: torch.nn.Parameter(torch.tensor(4.6055))
    "logit_scale": lambda t: t.fill_(4.6055),
}


def _torch_reset_fn(module: torch.nn.Module):
    """The stock torch.nn ``reset_parameters`` of a (ComfyUI-subclassed) module.

    ComfyUI's ``disable_weight_init`` ops override it with a no-op; walk the MRO
    to the first ``torch.nn`` class that defines it.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in cls.__dict__:
            return cls.__dict__["reset_parameters"]
    return None


def _init_module_(module: torch.nn.Module, qualname: str) -> None:
    """Default-initialise the *direct* tensors of one module in place."""
    fn = _torch_reset_fn(module)
    covered = set()
    if fn is not None:
        fn(module)
        covered = {n for n, _ in module.named_parameters(recurse=False)}
        covered |= {n for n, _ in module.named_buffers(recurse=False)}
    with torch.no_grad():
        for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if n in covered or t is None:
                continue
            if n in _SPECIAL_INIT:
                _SPECIAL_INIT[n](t)
            else:
                raise RuntimeError(
                    f"no deterministic init for {qualname}.{n} ({type(module).__name__}); "
                    "add it to _SPECIAL_INIT"
                )


def deterministic_init_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """PyTorch default init of every module, under ``seed``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, mod in model.named_modules():
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                _init_module_(mod, name)
    return model


def materialize_state_dict(model: torch.nn.Module, seed: int, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """State dict of a meta-device ``model`` with default init, built piecewise.

    Each module is materialised on CPU in fp32, initialised, copied out as
    ``dtype`` (floating tensors only) and released again, so peak memory is the
    size of the returned dict plus one module.  Keys follow ``model.state_dict()``.
    """
    keys = list(model.state_dict(keep_vars=True).keys())
    key_set = set(keys)
    out: Dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, mod in model.named_modules():
            direct = list(mod._parameters.items()) + list(mod._buffers.items())
            direct = [(n, t) for n, t in direct if t is not None]
            if not direct:
                continue
            for n, t in direct:
                if t.device.type != "meta":
                    raise RuntimeError(f"{name}.{n} is not on the meta device")
            mod.to_empty(device="cpu", recurse=False)
            # keep fp32 for init even if the model was built in another dtype
            _init_module_(mod, name)
            prefix = f"{name}." if name else ""
            for n, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None:
                    continue
                k = prefix + n
                if k not in key_set:  # non-persistent buffer
                    continue
                v = t.detach()
                out[k] = v.to(dtype).contiguous() if v.is_floating_point() else v.clone()
            mod.to_empty(device="meta", recurse=False)
    missing = [k for k in keys if k not in out]
    if missing:
        raise RuntimeError(f"state dict keys not materialised: {missing[:5]}")
    return {k: out[k] for k in keys}


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
# cached full-size files
# --------------------------------------------------------------------------
def cache_dir() -> Path:
    env = os.environ.get("LOWBIT_FIXTURE_CACHE")
    d = Path(env).expanduser() if env else repo_root() / ".cache" / "fixtures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_metadata(path: Path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                return None
            return json.loads(f.read(n)).get("__metadata__", {}) or {}
    except (OSError, ValueError):
        return None


def _is_current(path: Path, kind: str) -> bool:
    md = _read_metadata(path) if path.exists() else None
    return bool(md) and md.get("lowbit.fixture") == kind and md.get("lowbit.fixture_version") == FIXTURE_VERSION


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(name: str, kind: str, build: Callable[[Path], None]) -> Path:
    path = cache_dir() / name
    if _is_current(path, kind):
        return path
    with _file_lock(path.with_name(path.name + ".lock")):
        if _is_current(path, kind):  # built by another process while we waited
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            t0 = time.perf_counter()
            build(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            build_times[name] = time.perf_counter() - t0
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


build_times: Dict[str, float] = {}  # seconds spent building each file in this process


def _metadata(kind: str, seed: int, **extra) -> Dict[str, str]:
    md = {"lowbit.fixture": kind, "lowbit.fixture_version": FIXTURE_VERSION, "lowbit.seed": str(seed)}
    md.update({k: str(v) for k, v in extra.items()})
    return md


def _unet_state_dict(unet_config: dict, seed: int) -> Dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**unet_config, dtype=torch.float32, device="meta",
                         operations=comfy.ops.disable_weight_init)
    return materialize_state_dict(unet, seed)


def _build_sdxl_checkpoint(out: Path, seed: int) -> None:
    import_comfy()
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET_CONFIG))
    if type(model_config) is not comfy.supported_models.SDXL:
        raise RuntimeError(f"ComfyUI detects the SDXL unet config as {type(model_config).__name__}")

    # Same path as comfy.sd.save_checkpoint -> BaseModel.state_dict_for_saving:
    # unet/clip/vae state dicts through model_config.process_*_state_dict_for_saving.
    sd = model_config.process_unet_state_dict_for_saving(_unet_state_dict(SDXL_UNET_CONFIG, seed))

    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32)
    clip_sd = materialize_state_dict(clip, seed + 1)
    del clip
    sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))
    del clip_sd

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(SDXL_VAE_DDCONFIG), embed_dim=4)
    sd.update(model_config.process_vae_state_dict_for_saving(materialize_state_dict(vae, seed + 2)))
    del vae

    for k, t in sd.items():
        if not t.is_contiguous():
            sd[k] = t.contiguous()
    md = _metadata("sdxl_random_fp16", seed, **{"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    comfy.utils.save_torch_file(sd, str(out), metadata=md)


def _build_sd15_unet(out: Path, seed: int) -> None:
    import_comfy()
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    model_config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
    if type(model_config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects the SD1.5 unet config as {type(model_config).__name__}")
    sd = model_config.process_unet_state_dict_for_saving(_unet_state_dict(SD15_UNET_CONFIG, seed))
    comfy.utils.save_torch_file(sd, str(out), metadata=_metadata("sd15_random_unet_fp16", seed))


def sdxl_random_checkpoint(seed: int = 0) -> Path:
    """Path of the cached random full-size SDXL checkpoint (built on first use, ~7 GB)."""
    if seed == 0:
        name = "sdxl_random_fp16.safetensors"
    else:
        name = f"sdxl_random_fp16_seed{seed}.safetensors"
    return _cached(name, "sdxl_random_fp16", lambda p: _build_sdxl_checkpoint(p, seed))


def sd15_random_unet_file(seed: int = 0) -> Path:
    """Path of the cached random full-size SD1.5 UNet (``model.diffusion_model.*``, fp16, ~1.7 GB)."""
    name = "sd15_random_unet_fp16.safetensors" if seed == 0 else f"sd15_random_unet_fp16_seed{seed}.safetensors"
    return _cached(name, "sd15_random_unet_fp16", lambda p: _build_sd15_unet(p, seed))


# --------------------------------------------------------------------------
# API workflows
# --------------------------------------------------------------------------
def load_api_workflow(name: str, **overrides) -> dict:
    """Load ``<repo>/workflows/api/<name>.json`` (ComfyUI API format).

    ``overrides`` set node inputs: ``node_id__input_name=value`` (e.g.
    ``**{"3__steps": 2}``) or ``node_id={"input": value, ...}``.
    """
    path = repo_root() / "workflows" / "api" / (name if name.endswith(".json") else f"{name}.json")
    with open(path) as f:
        prompt = json.load(f)
    return apply_overrides(prompt, **overrides)


def apply_overrides(prompt: dict, **overrides) -> dict:
    for key, value in overrides.items():
        if "__" in key:
            node_id, inp = key.split("__", 1)
            updates = {inp: value}
        else:
            node_id, updates = key, value
            if not isinstance(updates, dict):
                raise TypeError(f"override {key!r} must be a dict of inputs or use node__input")
        if node_id not in prompt:
            raise KeyError(f"node {node_id!r} not in workflow (nodes: {sorted(prompt)})")
        prompt[node_id].setdefault("inputs", {}).update(updates)
    return prompt


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
