"""Recognise SDXL-family UNets from state-dict key names and shapes (no ComfyUI needed).

Accepted: UNets in LDM/ComfyUI key layout with label_emb (pooled + size conditioning) and cross-attention,
either bare or inside a checkpoint under `model.diffusion_model.`. SD1.x / SD2.x (no label_emb, context 768 /
1024), the SDXL refiner and diffusers-layout files are rejected with the reason.
"""
import re

from .errors import UnsupportedModelError

CHECKPOINT_PREFIX = "model.diffusion_model."
SDXL_BASE = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816}


def unet_state_dict(sd: dict) -> dict:
    """The UNet part of a checkpoint or bare UNet state dict, with keys relative to the diffusion model."""
    if any(k.startswith(CHECKPOINT_PREFIX) for k in sd):
        return {k[len(CHECKPOINT_PREFIX):]: v for k, v in sd.items() if k.startswith(CHECKPOINT_PREFIX)}
    if "input_blocks.0.0.weight" in sd:
        return dict(sd)
    if any(k.startswith(("down_blocks.", "unet.down_blocks.")) or k.startswith("conv_in.") for k in sd):
        raise UnsupportedModelError(
            "this is a diffusers-layout UNet; LowBit reads LDM/ComfyUI layout (keys 'input_blocks.*'): "
            "load it in ComfyUI and save it with ModelSave, or use the single-file SDXL checkpoint")
    raise UnsupportedModelError(
        "no UNet found: expected keys 'model.diffusion_model.input_blocks.*' (checkpoint) or "
        "'input_blocks.*' (bare UNet); pass an SDXL checkpoint or UNet file")


def _shape(sd, key):
    v = sd[key]
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _count_indices(keys, pattern):
    idx = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def detect_unet_config(sd: dict) -> dict:
    """Architecture facts of an SDXL-family UNet (keys relative to the diffusion model; values may be
    tensors or shapes). Raises UnsupportedModelError naming the family it saw instead."""
    keys = list(sd)
    ctx = next((_shape(sd, k)[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" not in sd:
        family = {768: "SD1.x", 1024: "SD2.x"}.get(ctx, "a non-SDXL UNet")
        raise UnsupportedModelError(
            f"this looks like {family} (context_dim {ctx}, no pooled/size 'label_emb' conditioning); LowBit "
            "quantizes SDXL-family UNets only: load an SDXL checkpoint")
    if ctx is None:
        raise UnsupportedModelError("UNet has no cross-attention (attn2); LowBit needs an SDXL-family UNet")
    if not any(k.endswith("proj_in.weight") and len(_shape(sd, k)) == 2 for k in keys):
        raise UnsupportedModelError("UNet uses conv proj_in (SD1.x style); LowBit needs an SDXL-family UNet")
    model_channels = _shape(sd, "input_blocks.0.0.weight")[0]
    n_input = _count_indices(keys, r"input_blocks\.(\d+)\.")
    n_output = _count_indices(keys, r"output_blocks\.(\d+)\.")
    depth_in = [_count_indices(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
                for i in range(1, n_input) if f"input_blocks.{i}.0.in_layers.0.weight" in sd]
    depth_out = [_count_indices(keys, rf"output_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
                 for i in range(n_output)]
    config = {
        "model_channels": model_channels,
        "in_channels": _shape(sd, "input_blocks.0.0.weight")[1],
        "out_channels": _shape(sd, "out.2.weight")[0],
        "context_dim": ctx,
        "adm_in_channels": _shape(sd, "label_emb.0.0.weight")[1],
        "transformer_depth": depth_in,
        "transformer_depth_middle": _count_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        "transformer_depth_output": depth_out[::-1],  # ComfyUI lists output depths last block first
        "use_linear_in_transformer": True,
    }
    base = all(config[k] == v for k, v in SDXL_BASE.items())
    if config["adm_in_channels"] == 2560:
        raise UnsupportedModelError("this is the SDXL refiner (adm_in_channels 2560); LowBit supports the SDXL "
                                    "base UNet and SDXL-architecture fine-tunes")
    config["arch"] = "sdxl" if base else "sdxl-family"
    return config


def conv_geometry(name: str, weight_shape) -> dict:
    """Stride/padding of an SDXL conv from its name and kernel size (state dicts do not store them)."""
    k = weight_shape[-1]
    stride = 2 if name.endswith(".op") else 1  # Downsample convs are `input_blocks.N.0.op`
    return {"stride": (stride, stride), "padding": (k // 2, k // 2)}
