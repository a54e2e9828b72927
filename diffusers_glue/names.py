"""LDM / ComfyUI UNet key names (what LowBit files store) -> diffusers `UNet2DConditionModel` names.

Derived from the keys alone (no config, no diffusers import): input blocks are split into resolution levels at
their downsampling convs (`input_blocks.N.0.op`), so every SDXL-architecture layout (3 or 4 levels, 1 or 2
ResBlocks per level, attention or not) maps without a table per model. ResBlock sub-modules are renamed
(RESNET); transformer internals keep their names in both layouts.
"""
import re

from ..quant_core.errors import UnsupportedModelError

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
FIXED = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
         "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _indices(keys, pattern) -> list:
    return sorted({int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m})


def block_names(keys) -> dict:
    """{LDM block prefix: (diffusers prefix, is a ResBlock)} for the blocks of a UNet with these keys."""
    keys = list(keys)
    out = {}
    levels, level = [], []
    for n in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in keys:
            out[f"input_blocks.{n}.0.op"] = (f"down_blocks.{len(levels)}.downsamplers.0.conv", False)
            levels.append(level)
            level = []
        else:
            level.append(n)
    levels.append(level)
    for x, blocks in enumerate(levels):
        for i, n in enumerate(blocks):
            out[f"input_blocks.{n}.0"] = (f"down_blocks.{x}.resnets.{i}", True)
            if f"input_blocks.{n}.1.proj_in.weight" in keys:
                out[f"input_blocks.{n}.1"] = (f"down_blocks.{x}.attentions.{i}", False)
    middle = _indices(keys, r"middle_block\.(\d+)\.")
    resnets = 0
    for n in middle:
        if f"middle_block.{n}.proj_in.weight" in keys:
            out[f"middle_block.{n}"] = ("mid_block.attentions.0", False)
        else:
            out[f"middle_block.{n}"] = (f"mid_block.resnets.{resnets}", True)
            resnets += 1
    # output blocks run the levels in reverse, one more ResBlock per level than the input side
    m = 0
    for x, blocks in enumerate(reversed(levels)):
        for i in range(len(blocks) + 1):
            out[f"output_blocks.{m}.0"] = (f"up_blocks.{x}.resnets.{i}", True)
            attention = f"output_blocks.{m}.1.proj_in.weight" in keys
            if attention:
                out[f"output_blocks.{m}.1"] = (f"up_blocks.{x}.attentions.{i}", False)
            up = f"output_blocks.{m}.{2 if attention else 1}.conv"
            if f"{up}.weight" in keys:
                out[up] = (f"up_blocks.{x}.upsamplers.0.conv", False)
            m += 1
    return out


def diffusers_key(key: str, blocks: dict) -> str:
    """The diffusers name of an LDM parameter or module name (`blocks` from block_names)."""
    for ldm, name in FIXED.items():
        if key == ldm or key.startswith(ldm + "."):
            return name + key[len(ldm):]
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            target, resnet = blocks[prefix]
            rest = ".".join(parts[cut:])
            if resnet:
                for ldm, name in RESNET.items():
                    if rest == ldm or rest.startswith(ldm + "."):
                        rest = name + rest[len(ldm):]
                        break
                else:
                    raise UnsupportedModelError(f"'{key}': not a ResBlock tensor LowBit can map to diffusers")
            return f"{target}.{rest}" if rest else target
    raise UnsupportedModelError(f"'{key}' has no diffusers counterpart: the UNet is not an SDXL-architecture one "
                                "diffusers' UNet2DConditionModel can hold")


def diffusers_names(keys) -> dict:
    """{LDM key: diffusers key} for every key of a UNet state dict (or layer names)."""
    keys = list(keys)
    blocks = block_names(keys)
    return {k: diffusers_key(k, blocks) for k in keys}
