"""The diffusers `UNet2DConditionModel` config of an SDXL-architecture UNet, derived from its tensor shapes (what
a LowBit file records), so no config is ever fetched: for SDXL base it is exactly stabilityai's
(`SDXL_BASE_CONFIG`, checked by the tests), for the refiner and the inpainting / instruct-pix2pix variants the
same derivation gives theirs. Heads are 64 channels wide, as in every SDXL-family model ComfyUI runs.
"""
import re

from ..quant_core.errors import UnsupportedModelError
from .names import block_names

HEAD_CHANNELS = 64
SDXL_BASE_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def _depth(keys, prefix) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(rf"{re.escape(prefix)}\.transformer_blocks\.(\d+)\.", k)]
             if m}
    return max(found) + 1 if found else 0


def diffusers_config(shapes: dict, head_channels: int = HEAD_CHANNELS, time_embed_dim: int = 256) -> dict:
    """UNet2DConditionModel config for a UNet with these LDM keys -> shapes; `head_channels` per attention head and
    `time_embed_dim` per size-conditioning number (SDXL: 64 and 256; other widths, e.g. the tests' tiny UNets,
    say theirs)."""
    keys = list(shapes)
    blocks = block_names(keys)
    levels = {}
    for ldm, (name, resnet) in blocks.items():
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)$", name)
        if m:
            levels.setdefault((m.group(1), int(m.group(2))), {}).setdefault(m.group(3), {})[int(m.group(4))] = ldm
    down = [levels[("down", x)] for x in range(sum(1 for side, _ in levels if side == "down"))]
    up = [levels[("up", x)] for x in range(sum(1 for side, _ in levels if side == "up"))]
    channels = [shapes[f"{level['resnets'][0]}.out_layers.3.weight"][0] for level in down]
    depths = [[_depth(keys, level["attentions"][i]) for i in sorted(level.get("attentions", {}))] for level in down]
    up_depths = [[_depth(keys, level["attentions"][i]) for i in sorted(level.get("attentions", {}))] for level in up]
    if any(len(set(d)) > 1 for d in depths) or ("middle_block.1.proj_in.weight" not in shapes):
        raise UnsupportedModelError("this SDXL variant (uneven transformer depths or no middle attention, e.g. SSD-1B, "
                                    "Vega, KOALA-700M) has no diffusers UNet2DConditionModel config LowBit can derive")
    middle = _depth(keys, "middle_block.1")
    used = {d[0] for d in depths if d}
    # levels without attention ignore their entry; diffusers' own configs put 1 there, or the one depth all
    # attention levels share (the refiner's 4, which also gives its middle depth: diffusers reads the last entry)
    fill = next(iter(used)) if len(used) == 1 else 1
    per_level_list = [d[0] if d else fill for d in depths]
    per_level = per_level_list[0] if len(set(per_level_list)) == 1 else per_level_list
    if middle != per_level_list[-1]:
        raise UnsupportedModelError(f"middle transformer depth {middle} differs from the last level's "
                                    f"{per_level_list[-1]}: diffusers cannot hold this UNet")
    counts = [len(level["resnets"]) for level in down]
    config = {
        "sample_size": 128,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "layers_per_block": counts[0] if len(set(counts)) == 1 else counts,
        "block_out_channels": channels,
        "transformer_layers_per_block": per_level,
        "attention_head_dim": [c // head_channels for c in channels],
        "cross_attention_dim": next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")),
        "use_linear_projection": True,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": shapes["label_emb.0.0.weight"][1],
    }
    mirrored = [[d] * len(up[i]["resnets"]) for i, d in enumerate(reversed(per_level_list))]
    if any(u and u != m for u, m in zip(up_depths, mirrored)):
        config["reverse_transformer_layers_per_block"] = [u or [1] * len(up[i]["resnets"])
                                                          for i, u in enumerate(up_depths)]
    return config
