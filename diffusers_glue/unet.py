"""`load_unet`: a LowBit file as a diffusers `UNet2DConditionModel`, built offline from a config derived from the
file's shapes (config.py), holding LowBit's own quantized layer modules under the diffusers names (names.py) and
the file's 16-bit tensors. One implementation of the layers, layouts and validation for both hosts.

Not yet in diffusers (refused with the reason, never approximated): activation-quantized files (dgq, pcr,
minmax), whose quantizers select their parameters by the current timestep through a hook LowBit installs in
ComfyUI's UNet; the SDXL variants whose layout UNet2DConditionModel cannot express (config.py).
"""
import torch

from ..quant_core import fileformat
from ..quant_core.actquant import ActQuantConv2d, ActQuantLinear
from ..quant_core.errors import LowBitError
from ..quant_core.qlayers import set_submodule
from .config import diffusers_config
from .names import diffusers_names


def logical_shapes(lowbit_file) -> dict:
    """LDM key -> shape of the fp16 UNet the file quantizes (the layers' logical weights included)."""
    shapes = {k: tuple(v.shape) for k, v in lowbit_file.dense.items()}
    for name, layer in lowbit_file.layers.items():
        shapes[f"{name}.weight"] = tuple(layer.weight_shape)
        if layer.bias is not None:
            shapes[f"{name}.bias"] = tuple(layer.bias.shape)
    return shapes


def load_unet(path, dtype=torch.float16, device="cpu", config: dict = None):
    """The LowBit file at `path` as a diffusers UNet2DConditionModel in eval mode: its 16-bit tensors in `dtype`
    on `device`, quantized layers dequantizing to the input's dtype. `config`: the UNet2DConditionModel config
    (default: derived from the file, no download)."""
    from diffusers import UNet2DConditionModel
    f = fileformat.load(path)
    if any(isinstance(m, (ActQuantLinear, ActQuantConv2d)) for m in f.layers.values()):
        raise LowBitError(f"{path}: {f.info.method} quantizes activations per timestep, which LowBit runs only in "
                          "ComfyUI so far; use a weight-only file (rtn, vq, auto) in diffusers, or ComfyUI")
    shapes = logical_shapes(f)
    names = diffusers_names(shapes)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config or diffusers_config(shapes))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    mismatched = [k for k in shapes if expected.get(names[k]) != shapes[k]]
    if mismatched or len(expected) != len(shapes):
        raise LowBitError(f"{path}: the file's UNet does not match the diffusers config (e.g. {mismatched[:3]}, "
                          f"{len(shapes)} tensors against {len(expected)}); pass the right config or re-create the "
                          "file")
    for name, layer in f.layers.items():
        set_submodule(unet, names[f"{name}.weight"][:-len(".weight")], layer)
    unet.load_state_dict({names[k]: (v.to(dtype) if v.is_floating_point() else v) for k, v in f.dense.items()},
                         strict=False, assign=True)
    left = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise LowBitError(f"{path}: {len(left)} diffusers tensors got no value (e.g. {left[:3]}); the file is "
                          "incomplete: re-create it")
    unet.lowbit_info = f.info
    return unet.to(device).eval().requires_grad_(False)
