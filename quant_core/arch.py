"""Recognise SDXL-family UNets from state-dict key names and shapes (no ComfyUI needed).

Accepted: UNets in LDM/ComfyUI key layout with label_emb (pooled + size conditioning) and linear cross-attention,
either bare or inside a checkpoint under `model.diffusion_model.`: the SDXL base and every SDXL-architecture
variant ComfyUI 0.3.75's model detection knows (`VARIANTS`: inpainting 9-channel, instruct-pix2pix 8-channel,
SSD-1B, Segmind Vega, KOALA 700M / 1B, the refiner), and other SDXL-structured UNets ("sdxl-family": the tests'
tiny UNets, the testbed). SD1.x / SD2.x, SD2 unCLIP, Stable Video Diffusion and diffusers-layout files are
rejected with the reason.
"""
import re

from .errors import UnsupportedModelError
from .sampling_settings import MARKER_KEYS

CHECKPOINT_PREFIX = "model.diffusion_model."
SDXL_BASE = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816}
SDXL_REFINER = {"model_channels": 384, "context_dim": 1280, "adm_in_channels": 2560}
# variant -> (what identifies it besides SDXL_BASE / SDXL_REFINER: transformer depth per input ResBlock and input
# channels; ComfyUI's supported_models class that runs it). Facts from ComfyUI 0.3.75 comfy/supported_models.py.
VARIANTS = {
    "base": ((0, 0, 2, 2, 10, 10), 4, "SDXL"),
    "inpaint": ((0, 0, 2, 2, 10, 10), 9, "SDXL"),
    "instruct-pix2pix": ((0, 0, 2, 2, 10, 10), 8, "SDXL_instructpix2pix"),
    "ssd-1b": ((0, 0, 2, 2, 4, 4), 4, "SSD1B"),
    "vega": ((0, 0, 1, 1, 2, 2), 4, "Segmind_Vega"),
    "koala-700m": ((0, 2, 5), 4, "KOALA_700M"),
    "koala-1b": ((0, 2, 6), 4, "KOALA_1B"),
    "refiner": ((0, 0, 4, 4, 4, 4, 0, 0), 4, "SDXLRefiner"),
}
# the file's arch tag of each variant: the refiner has its own (other text encoder, no SDXL LoRA fits it)
ARCH_OF_VARIANT = {v: "sdxl-refiner" if v == "refiner" else "sdxl" for v in VARIANTS}


def unet_state_dict(sd: dict) -> dict:
    """The UNet part of a checkpoint or bare UNet state dict, with keys relative to the diffusion model."""
    if any(k.startswith(CHECKPOINT_PREFIX) for k in sd):
        return {k[len(CHECKPOINT_PREFIX):]: v for k, v in sd.items() if k.startswith(CHECKPOINT_PREFIX)}
    if "input_blocks.0.0.weight" in sd:  # a bare UNet file; its prediction-type markers are not UNet tensors
        return {k: v for k, v in sd.items() if k not in MARKER_KEYS}
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
    if any(".time_stack." in k or ".time_mixer." in k for k in keys):
        raise UnsupportedModelError("this is a video UNet (Stable Video Diffusion: temporal layers); LowBit "
                                    "quantizes SDXL-family image UNets only")
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
    if ctx == 1024:
        raise UnsupportedModelError(f"this looks like SD2.x unCLIP (context_dim 1024, label_emb of "
                                    f"{config['adm_in_channels']}); LowBit quantizes SDXL-family UNets only")
    config["variant"] = variant_of(config)
    config["arch"] = ARCH_OF_VARIANT.get(config["variant"], "sdxl-family")
    return config


def variant_of(config: dict) -> str:
    """The VARIANTS name of an architecture config (detect_unet_config's), or "custom" for other SDXL-structured
    UNets; a UNet with SDXL's or the refiner's widths but a layout ComfyUI does not know is an error."""
    for dims in (SDXL_BASE, SDXL_REFINER):
        if all(config[k] == v for k, v in dims.items()):
            break
    else:
        return "custom"
    for name, (depth, in_channels, _) in VARIANTS.items():
        if tuple(config["transformer_depth"]) == depth and config["in_channels"] == in_channels \
                and (name == "refiner") == (dims is SDXL_REFINER):
            return name
    raise UnsupportedModelError(
        f"SDXL-width UNet with transformer depths {config['transformer_depth']} and {config['in_channels']} input "
        f"channels matches no SDXL variant ComfyUI can run ({', '.join(VARIANTS)}); LowBit cannot rebuild it")


def conv_geometry(name: str, weight_shape) -> dict:
    """Stride/padding of an SDXL conv from its name and kernel size (state dicts do not store them)."""
    k = weight_shape[-1]
    stride = 2 if name.endswith(".op") else 1  # Downsample convs are `input_blocks.N.0.op`
    return {"stride": (stride, stride), "padding": (k // 2, k // 2)}
