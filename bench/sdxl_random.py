"""A full-size, randomly initialised SDXL checkpoint (UNet + CLIP-L + CLIP-G + VAE, fp16, standard key layout) that
stock ComfyUI loads with CheckpointLoaderSimple: what `bench lowvram` runs on a GPU without `--checkpoint` (no SDXL
weights can be downloaded here), and the tests' `sdxl_random_checkpoint` fixture (tests/helpers/fixtures.py
imports it from here, with the deterministic init and the file cache below, which its SD1.5 fixture shares).

Deterministic by seed, no downloads. Big models are built on the ``meta`` device and materialised one module at a
time (fp32 init -> fp16 copy), so peak RAM stays ~ the fp16 file size (~7 GB for SDXL). Files are cached under
``<repo>/.cache/fixtures`` (override with ``LOWBIT_FIXTURE_CACHE``), built once under a file lock and written
atomically; a cached file whose recipe version (FIXTURE_VERSION, in its safetensors metadata) differs is rebuilt.
ComfyUI is imported in CPU mode for the build: `sdxl_random_checkpoint_in_child` builds in a child process, so a
process that runs ComfyUI on a GPU can have it, and the ~9 GB the build touches go back to the OS.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from ..quant_core.fileformat import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]

# Bump when the recipe changes: cached files with another version are rebuilt.
FIXTURE_VERSION = "1"

# --------------------------------------------------------------------------
# UNet config (kwargs of comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel,
# without dtype/device/operations).  Same keys ComfyUI's model_detection emits
# plus the supported_models unet_extra_config (num_heads/num_head_channels).
# --------------------------------------------------------------------------
COMMON_UNET_CONFIG = {
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
    **COMMON_UNET_CONFIG,
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

# The SDXL-architecture variants ComfyUI 0.3.75 runs (lowbit.quant_core.arch.VARIANTS), as overrides of the base
# config; values from ComfyUI's comfy/model_detection.py (its diffusers-config table).
SDXL_VARIANT_OVERRIDES = {
    "base": {},
    "inpaint": {"in_channels": 9},
    "instruct-pix2pix": {"in_channels": 8},
    "refiner": {"model_channels": 384, "adm_in_channels": 2560, "context_dim": 1280, "num_res_blocks": [2, 2, 2, 2],
                "channel_mult": [1, 2, 4, 4], "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0],
                "transformer_depth_middle": 4, "transformer_depth_output": [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0]},
    "ssd-1b": {"transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_middle": -1,
               "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]},
    "vega": {"transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": -1,
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]},
    "koala-700m": {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5], "transformer_depth_middle": -2,
                   "transformer_depth_output": [0, 0, 2, 2, 5, 5]},
    "koala-1b": {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 6], "transformer_depth_middle": 6,
                 "transformer_depth_output": [0, 0, 2, 2, 6, 6]},
}


def variant_unet_config(variant: str) -> dict:
    """UNetModel kwargs of a full-size SDXL variant (SDXL_VARIANT_OVERRIDES)."""
    return {**SDXL_UNET_CONFIG, **SDXL_VARIANT_OVERRIDES[variant]}


# ComfyUI's default SD/SDXL AutoencoderKL ddconfig (comfy/sd.py VAE.__init__).
SDXL_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

SDXL_UNET_PARAMS = 2_567_463_684  # parameter count of the SDXL base UNet


def import_comfy_cpu():
    """ComfyUI (`<repo>/.comfyui` or $LOWBIT_COMFYUI) in CPU mode, as the builds need it; RuntimeError if this
    process already imported it on another device (the device is fixed when model_management is first imported)."""
    from ..testbed.model import import_comfy
    comfy = import_comfy(cpu=True)
    mm = comfy.model_management
    if mm.cpu_state != mm.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before import_comfy(); it is not in CPU mode")
    return comfy


# --------------------------------------------------------------------------
# deterministic init
# --------------------------------------------------------------------------
_SPECIAL_INIT: Dict[str, Callable] = {
    # sd1_clip.SDClipModel: torch.nn.Parameter(torch.tensor(4.6055))
    "logit_scale": lambda t: t.fill_(4.6055),
}


def _torch_reset_fn(module):
    """The stock torch.nn ``reset_parameters`` of a (ComfyUI-subclassed) module.

    ComfyUI's ``disable_weight_init`` ops override it with a no-op; walk the MRO
    to the first ``torch.nn`` class that defines it.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in cls.__dict__:
            return cls.__dict__["reset_parameters"]
    return None


def _init_module_(module, qualname: str) -> None:
    """Default-initialise the *direct* tensors of one module in place."""
    import torch
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


def deterministic_init_(model, seed: int):
    """PyTorch default init of every module, under ``seed``; global RNG untouched."""
    import torch
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, mod in model.named_modules():
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                _init_module_(mod, name)
    return model


def materialize_state_dict(model, seed: int, dtype=None) -> Dict:
    """State dict of a meta-device ``model`` with default init, built piecewise.

    Each module is materialised on CPU in fp32, initialised, copied out as
    ``dtype`` (floating tensors only; default fp16) and released again, so peak memory is the
    size of the returned dict plus one module.  Keys follow ``model.state_dict()``.
    """
    import torch
    dtype = torch.float16 if dtype is None else dtype
    keys = list(model.state_dict(keep_vars=True).keys())
    key_set = set(keys)
    out: Dict = {}
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


def unet_state_dict(unet_config: dict, seed: int) -> Dict:
    """Default-initialised state dict (fp16) of ComfyUI's UNetModel with `unet_config`."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**unet_config, dtype=torch.float32, device="meta",
                         operations=comfy.ops.disable_weight_init)
    return materialize_state_dict(unet, seed)


# --------------------------------------------------------------------------
# cached files
# --------------------------------------------------------------------------
def cache_dir() -> Path:
    env = os.environ.get("LOWBIT_FIXTURE_CACHE")
    d = Path(env).expanduser() if env else REPO_ROOT / ".cache" / "fixtures"
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
    import fcntl
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


build_times: Dict[str, float] = {}  # seconds spent building each file in this process


def cached(name: str, kind: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir() / name`, built with `build(tmp_path)` unless a current file of this `kind` is there."""
    path = cache_dir() / name
    if _is_current(path, kind):
        return path
    with _file_lock(path.with_name(path.name + ".lock")):
        if _is_current(path, kind):  # built by another process while we waited
            return path
        def write(tmp):
            build(Path(tmp))
            os.chmod(tmp, 0o644)
        t0 = time.perf_counter()
        atomic_write(path, write, overwrite=True)
        build_times[name] = time.perf_counter() - t0
    return path


def fixture_metadata(kind: str, seed: int, **extra) -> Dict[str, str]:
    """safetensors metadata of a cached file: its kind, recipe version and seed (what `cached` checks)."""
    md = {"lowbit.fixture": kind, "lowbit.fixture_version": FIXTURE_VERSION, "lowbit.seed": str(seed)}
    md.update({k: str(v) for k, v in extra.items()})
    return md


# --------------------------------------------------------------------------
# the SDXL checkpoint
# --------------------------------------------------------------------------
def _build_sdxl_checkpoint(out: Path, seed: int) -> None:
    import torch
    import_comfy_cpu()
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
    sd = model_config.process_unet_state_dict_for_saving(unet_state_dict(SDXL_UNET_CONFIG, seed))

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
    md = fixture_metadata("sdxl_random_fp16", seed, **{"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    comfy.utils.save_torch_file(sd, str(out), metadata=md)


def sdxl_random_checkpoint(seed: int = 0) -> Path:
    """Path of the cached random full-size SDXL checkpoint (built on first use, in this process, ~7 GB)."""
    if seed == 0:
        name = "sdxl_random_fp16.safetensors"
    else:
        name = f"sdxl_random_fp16_seed{seed}.safetensors"
    return cached(name, "sdxl_random_fp16", lambda p: _build_sdxl_checkpoint(p, seed))


def _build_variant_unet(out: Path, variant: str, markers: dict, seed: int) -> None:
    import torch
    import_comfy_cpu()
    import comfy.utils
    sd = unet_state_dict(variant_unet_config(variant), seed)
    sd.update({k: torch.tensor(float(v)) for k, v in markers.items()})
    md = fixture_metadata("sdxl_variant_unet", seed, variant=variant, markers=json.dumps(markers, sort_keys=True))
    comfy.utils.save_torch_file(sd, str(out), metadata=md)


def sdxl_variant_unet(variant: str, markers: Optional[dict] = None, seed: int = 0) -> Path:
    """Path of a cached random full-size UNet-only file (fp16) of an SDXL variant (SDXL_VARIANT_OVERRIDES), with
    the checkpoint marker keys `markers` (name -> value, e.g. {"v_pred": 0, "ztsnr": 0}: see
    lowbit.quant_core.sampling_settings) that make ComfyUI build it as a v-prediction / EDM model."""
    markers = dict(markers or {})
    suffix = "".join(f"_{k.replace('.', '-')}" for k in sorted(markers)) + ("" if seed == 0 else f"_seed{seed}")
    return cached(f"sdxl_{variant}_unet_fp16{suffix}.safetensors", "sdxl_variant_unet",
                  lambda p: _build_variant_unet(p, variant, markers, seed))


def sdxl_random_checkpoint_in_child(seed: int = 0) -> Path:
    """`sdxl_random_checkpoint(seed)`, built (if missing) in a child process: the build puts ComfyUI in CPU mode,
    and the ~9 GB it touches go back to the OS."""
    code = f"from {__name__} import sdxl_random_checkpoint as f; print(f({int(seed)}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])
