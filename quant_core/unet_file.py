"""Quantize SDXL UNets straight from checkpoint files (no model code needed for data-free methods; methods that
run the UNet get it from a `build_unet` callable the caller provides, e.g. the CLI's ComfyUI loader)."""
import os

import torch
from safetensors import safe_open
from torch import nn

from .api import quantize_layers_of
from .arch import CHECKPOINT_PREFIX, conv_geometry, detect_unet_config, unet_state_dict
from .errors import FileFormatError, LowBitError
from .fileformat import BUNDLE_PREFIXES, Header, bundle, bundle_part, file_tensors, read_safetensors_header
from .methods import method_for_config
from .qlayers import split_result
from .sampling_settings import MARKER_KEYS, from_markers
from .selection import choose_layers, is_selected_name, select_layers


def read_unet_state_dict(path) -> tuple[dict, dict]:
    """(unet_config, UNet tensors) of a safetensors checkpoint or bare UNet file. The architecture is checked
    from the header's shapes before any tensor is read, and only the UNet's tensors are read."""
    st = read_safetensors_header(path)
    shapes = unet_state_dict({k: v["shape"] for k, v in st.items() if k != "__metadata__"})
    unet_config = detect_unet_config(shapes)
    prefixed = any(k.startswith(CHECKPOINT_PREFIX) for k in st)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            sd = {k: f.get_tensor(CHECKPOINT_PREFIX + k if prefixed else k) for k in shapes}
    except Exception as e:
        raise FileFormatError(f"{os.fspath(path)}: cannot read tensors ({e}); the file is corrupt") from None
    return unet_config, sd


def layer_modules(sd: dict) -> dict:
    """name -> nn.Linear / nn.Conv2d holding the weights of the selected layers of a UNet state dict."""
    layers = {}
    for key in sorted(sd):
        if not key.endswith(".weight"):
            continue
        name, w = key[: -len(".weight")], sd[key]
        if not is_selected_name(name) or w.dim() not in (2, 4):
            continue
        bias = sd.get(name + ".bias")
        if w.dim() == 2:
            m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        else:
            m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=bias is not None, device="meta",
                          **conv_geometry(name, w.shape))
        m.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias, requires_grad=False)
        layers[name] = m
    return layers


def quantize_checkpoint(path, config, progress=None, layers=None, calibration=None, build_unet=None,
                        keep_clip_vae=False, **options) -> tuple[dict, dict]:
    """(tensors, header) of the LowBit file for the UNet in `path`; `layers` chooses among the selectable layers
    as in lowbit.quant_core.api.quantize (None = all, a regular expression, a callable). Methods that run the
    UNet (calibrated methods, gptq/adaround rounding) need `calibration` and `build_unet(unet_state_dict)`, which
    returns the runnable UNet module holding those weights (its module names are the state dict's);
    `keep_clip_vae` makes a one-file checkpoint with the file's text encoders and VAE in 16 bits; `options`
    go to lowbit.quant_core.api.quantize_layers_of (resume, sampler, calibration_id)."""
    unet_config, sd = read_unet_state_dict(path)
    parts = read_clip_vae(path) if keep_clip_vae else {}  # checked before the work
    for key, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FileFormatError(f"{os.fspath(path)}: UNet tensor '{key}' holds NaN/inf; the checkpoint is broken")
    method = method_for_config(config)
    if getattr(config, "target_gb", 0):  # auto at a file size: the 16-bit rest of the UNet is known here
        from .methods.auto import with_size_target
        selected = choose_layers(layer_modules(sd), layers)
        named = {f"{n}.{t}" for n in selected for t in ("weight", "bias")}
        config = with_size_target(config, selected, {k: t for k, t in sd.items() if k not in named})
    if method.runs_model(config) and calibration is not None:
        if build_unet is None:
            raise LowBitError(f"{method.name} runs the UNet: quantize_checkpoint needs build_unet")
        unet = build_unet(sd)
        chosen = choose_layers(select_layers(unet), layers)
    else:
        unet, chosen = None, choose_layers(layer_modules(sd), layers)
    qlayers, retrained = split_result(quantize_layers_of(unet, chosen, config, calibration, progress=progress,
                                                         **options))
    dense = {k: retrained[k].to(t.dtype) if k in retrained else t for k, t in sd.items()
             if k.rsplit(".", 1)[0] not in qlayers}
    tensors, table = file_tensors(qlayers, dense)
    header = Header(method.name, method.describe(config), unet_config.pop("arch"), unet_config,
                    sampling=from_markers(read_markers(path), unet_config["variant"])).to_json(table)
    return bundle(tensors, header, parts) if parts else (tensors, header)


def read_clip_vae(path) -> dict:
    """{"clip": ..., "vae": ...} tensors of a full checkpoint under their own keys; an error naming what is
    missing otherwise."""
    keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
    found = {part: [k for k in keys if bundle_part(k) == part] for part in BUNDLE_PREFIXES}
    if not all(found.values()):
        missing = " and ".join(p for p, ks in found.items() if not ks)
        raise LowBitError(f"{os.fspath(path)} has no {missing} (keys {', '.join(sum(BUNDLE_PREFIXES.values(), ()))}"
                          "...): keeping CLIP and VAE needs a full SDXL checkpoint; quantize without keeping them")
    with safe_open(os.fspath(path), framework="pt") as f:
        return {part: {k: f.get_tensor(k) for k in ks} for part, ks in found.items()}


def read_markers(path) -> dict:
    """The marker keys of a checkpoint that say its prediction type and schedule (sampling_settings), read."""
    names = [k for k in read_safetensors_header(path) if k in MARKER_KEYS]
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in names}
