"""VQ: additive vector quantization of the UNet weights (VQDM, arXiv 2409.00492, built on AQLM).

Formats "2x8g8" / "3x8g8" / "4x8g8": M = 2/3/4 codebooks of 256 codewords over groups of 8 inputs, one fp16 scale
per output row: ≈2.15 / 3.15 / 4.15 bits per weight (layout `vq`, codec lowbit.quant_core.vq_codec).

With a calibration record (`quantize_model`) the UNet is quantized block by block in execution order
(input_blocks.0..N, middle_block, output_blocks.0..N, as VQDM): the recorded UNet calls are replayed, with every
earlier block already quantized (`sequential`, error-aware), to collect XᵀX of the block's layers, and each layer
minimises ‖XWᵀ − XŴᵀ‖². Replays stop after the block being measured. Optionally (`distill_steps` > 0) the
codebooks and scales of all layers are then fine-tuned, codes frozen, on the MSE between the quantized UNet's
outputs and the recorded full-precision outputs (the paper's distillation stage, on the calibration calls
instead of fresh teacher trajectories).
Without calibration (`quantize_layers`, data-free) every layer minimises the plain weight error (H = I): a
clearly lower-quality fallback, used when no record is given or only weights are at hand.
"""
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..calib.replay import blocks_in_order, replay
from ..calib.statistics import collect_xtx
from ..errors import LowBitError
from ..layouts.vq import CODEBOOK_BITS, MAX_CODEBOOKS
from ..qlayers import make_quantized_layer, matrix_view, set_submodule
from ..vq_codec import fit_vq
from .base import Method, register_method

GROUP_SIZE = 8
_FORMAT = re.compile(r"(\d+)x8g8")


@dataclass(frozen=True)
class VQConfig:
    num_codebooks: int = 3
    beam_size: int = 8
    max_rounds: int = 10       # beam-search + refit rounds per layer (fewer when a round gains < tol)
    refit_iters: int = 25      # conjugate-gradient iterations of the least-squares codebook refit
    kmeans_iters: int = 30     # Lloyd iterations per codebook of the residual k-means init
    tol: float = 0.01          # stop when a round lowers the layer's loss by less than this fraction
    damping: float = 0.01      # added to XᵀX's diagonal, as a fraction of its mean
    seed: int = 0
    sequential: bool = True    # statistics of a block are collected with the earlier blocks quantized
    distill_steps: int = 0     # fine-tuning steps of codebooks + scales on the recorded outputs (0: off)
    distill_lr: float = 1e-4   # Adam step size relative to each tensor's magnitude

    def __post_init__(self):
        if not 1 <= self.num_codebooks <= MAX_CODEBOOKS:
            raise LowBitError(f"VQ: num_codebooks {self.num_codebooks} must be 1..{MAX_CODEBOOKS}")
        if self.beam_size < 1 or self.max_rounds < 0 or self.refit_iters < 0 or self.kmeans_iters < 0:
            raise LowBitError("VQ: beam_size must be ≥ 1 and max_rounds / refit_iters / kmeans_iters ≥ 0")
        if self.distill_steps < 0 or self.distill_lr <= 0:
            raise LowBitError("VQ: distill_steps must be ≥ 0 and distill_lr > 0")

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{CODEBOOK_BITS}g{GROUP_SIZE}"

    @classmethod
    def parse(cls, text: str, **overrides) -> "VQConfig":
        """VQConfig for a format name such as "3x8g8" (M codebooks x 8 bits, groups of 8)."""
        match = _FORMAT.fullmatch(text.strip())
        if match is None:
            raise LowBitError(f"VQ: unknown format {text!r}; use MxBgG with 8-bit codebooks and groups of 8: "
                              "2x8g8, 3x8g8 or 4x8g8")
        return cls(num_codebooks=int(match.group(1)), **overrides)


def quantize_vq_layer(name: str, module: nn.Module, hessian: Optional[torch.Tensor], config: VQConfig) -> nn.Module:
    """The `vq` replacement of one Linear/Conv2d; hessian = its inputs' XᵀX, None for the data-free fit."""
    w = matrix_view(module.weight.detach())
    if w.shape[1] % GROUP_SIZE:
        raise LowBitError(f"VQ: layer {name} has K = {w.shape[1]} inputs, not a multiple of {GROUP_SIZE}; "
                          "leave it out of the quantized layers")
    fit = fit_vq(w, hessian, config.num_codebooks, group_size=GROUP_SIZE, beam_size=config.beam_size,
                 max_rounds=config.max_rounds, refit_iters=config.refit_iters, kmeans_iters=config.kmeans_iters,
                 tol=config.tol, damping=config.damping, seed=config.seed)
    params = {"num_codebooks": config.num_codebooks, "codebook_bits": CODEBOOK_BITS, "group_size": GROUP_SIZE}
    return make_quantized_layer(module, "vq", params,
                                {"codes": fit.codes, "codebooks": fit.codebooks, "scales": fit.scales})


def _swap(unet: nn.Module, modules: dict) -> dict:
    """Put `modules` (name -> module) into `unet`; returns the modules they replaced."""
    replaced = {}
    for name, module in modules.items():
        replaced[name] = unet.get_submodule(name)
        set_submodule(unet, name, module)
    return replaced


def distill(unet: nn.Module, quantized: dict, calibration, steps: int, lr: float) -> list:
    """Fine-tune the codebooks and scales of `quantized` (name -> vq layer, already inside `unet`), codes frozen,
    on the MSE between `unet`'s outputs and the recorded ones, cycling over the calibration calls. Adam on fp32
    copies, step size `lr` times each tensor's mean magnitude; the fp16 tensors are updated in place at the end.
    Returns the loss of every step.
    """
    masters, groups = {}, []
    for name, layer in quantized.items():
        for tensor_name in ("codebooks", "scales"):
            stored = getattr(layer, tensor_name)
            master = stored.detach().float().clone().requires_grad_(True)
            masters[f"{name}.{tensor_name}"] = (stored, master)
            groups.append({"params": [master], "lr": lr * master.abs().mean().clamp_min(1e-8).item()})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.95))
    device = next(unet.parameters()).device
    losses = []
    # the reference decode is differentiable, the fused kernels are not
    try:
        with ops.reference_only(), torch.enable_grad():
            for step in range(steps):
                i = step % len(calibration)
                overrides = {key: master for key, (_, master) in masters.items()}
                out = torch.func.functional_call(unet, overrides, kwargs={k: v.to(device) for k, v in calibration.inputs[i].items()})
                loss = F.mse_loss(out.float(), calibration.outputs[i].to(device).float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        with torch.no_grad():
            for stored, master in masters.values():
                stored.copy_(master.to(stored.dtype))
    return losses


@register_method
class VQ(Method):
    name = "vq"
    config_type = VQConfig

    def quantize_layers(self, layers, config, calibration=None, progress=None):
        """Data-free: each layer minimises its plain weight error (H = I), no calibration used. Lower quality
        than `quantize_model` with a calibration record."""
        out = {}
        for i, (name, module) in enumerate(layers.items()):
            out[name] = quantize_vq_layer(name, module, None, config)
            if progress:
                progress(i + 1, len(layers), name)
        return out

    def quantize_model(self, unet, layers, config, calibration=None, progress=None, *, sampler=None, resume=None):
        if calibration is None or len(calibration) == 0:
            warnings.warn("VQ without a calibration record: data-free fit of the weights only (lower quality); "
                          "record calibration calls for the Hessian-aware method", stacklevel=2)
            return self.quantize_layers(layers, config, None, progress)
        if config.distill_steps and calibration.outputs is None:
            raise LowBitError("VQ: distillation needs a calibration record with the full-precision outputs; "
                              "record with outputs or set distill_steps=0")
        quantized, replaced = {}, {}
        try:
            for block_name, block_layers in blocks_in_order(unet, layers).items():
                block = unet.get_submodule(block_name)
                hessians = collect_xtx(unet, block_layers, lambda: replay(unet, calibration.inputs, stop_after=block))
                for name, module in block_layers.items():
                    # a layer the replay never reached (nothing to measure) gets the data-free fit
                    quantized[name] = quantize_vq_layer(name, module, hessians.get(name), config)
                    if progress:
                        progress(len(quantized), len(layers), name)
                if config.sequential:
                    replaced.update(_swap(unet, {n: quantized[n] for n in block_layers}))
            if config.distill_steps:
                replaced.update(_swap(unet, {n: q for n, q in quantized.items() if n not in replaced}))
                distill(unet, quantized, calibration, config.distill_steps, config.distill_lr)
        finally:
            _swap(unet, replaced)
        return quantized

    def describe(self, config) -> dict:
        return {**asdict(config), "format": config.name}
