"""Which layers of an SDXL-family UNet get quantized.

Quantized: every Linear and Conv2d inside input_blocks / middle_block / output_blocks (attention q/k/v/out,
GEGLU and FF out, proj_in/out, ResNet and skip convs, down/upsample convs). Kept in 16-bit: conv_in
(input_blocks.0.0), conv_out (out.*), time and label embeddings, every ResNet `emb_layers` projection, norms,
biases. Names are in ComfyUI/LDM layout relative to the diffusion model.
"""
import re

from torch import nn

QUANTIZED_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
CONV_IN = "input_blocks.0.0"


def is_selected_name(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in QUANTIZED_BLOCKS and name != CONV_IN and "emb_layers" not in parts


def is_quantizable_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def select_layers(unet: nn.Module) -> dict:
    """{name: module} of the layers to quantize, in module order."""
    return {name: m for name, m in unet.named_modules() if is_selected_name(name) and is_quantizable_module(m)}


def choose_layers(layers: dict, which=None) -> dict:
    """The subset of `layers` (name -> module) that `which` names: None = all; a regular expression string
    (searched in each name, '' = all); a callable(name, module) -> bool. A pattern that is invalid or matches
    nothing is an error naming the problem."""
    from .errors import LowBitError
    if which is None or which == "":
        return layers
    if callable(which):
        chosen = {name: m for name, m in layers.items() if which(name, m)}
        described = "the layer filter"
    else:
        try:
            regex = re.compile(which)
        except re.error as e:
            raise LowBitError(f"layers pattern {which!r} is not a valid regular expression ({e})") from None
        chosen = {name: m for name, m in layers.items() if regex.search(name)}
        described = f"layers pattern {which!r}"
    if not chosen:
        raise LowBitError(f"{described} matches none of the {len(layers)} quantizable layers (names like "
                          "'output_blocks.2.1.transformer_blocks.0.attn1.to_q')")
    return chosen
