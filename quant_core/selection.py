"""Which layers of an SDXL-family UNet get quantized.

Quantized: every Linear and Conv2d inside input_blocks / middle_block / output_blocks (attention q/k/v/out,
GEGLU and FF out, proj_in/out, ResNet and skip convs, down/upsample convs). Kept in 16-bit: conv_in
(input_blocks.0.0), conv_out (out.*), time and label embeddings, every ResNet `emb_layers` projection, norms,
biases. Names are in ComfyUI/LDM layout relative to the diffusion model.
"""
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
