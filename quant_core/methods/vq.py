"""VQ: additive vector quantization of the UNet weights (VQDM, arXiv 2409.00492, built on AQLM).

Formats "2x8g8" / "3x8g8" / "4x8g8": M = 2/3/4 codebooks of 256 codewords over groups of 8 inputs, one fp16 scale
per output row: ≈2.15 / 3.15 / 4.15 bits per weight (layout `vq`, codec lowbit.quant_core.vq_codec).

With a calibration record (`quantize_model`) the UNet is quantized block by block in execution order
(input_blocks.0..N, middle_block, output_blocks.0..N, as VQDM): the recorded UNet calls are replayed, with every
earlier block already quantized (`sequential`, error-aware), to collect XᵀX of the block's layers, and each layer
minimises ‖XWᵀ − XŴᵀ‖². Replays stop after the block being measured. Then (`distill_epochs` > 0, the default)
the paper's distillation stage: codes frozen, the codebooks, scales and biases of all layers, and (`distill_dense`)
the UNet's other 16-bit parameters, are trained against the full-precision UNet on its own sampling trajectories
from fresh noise (lowbit.quant_core.distillation); the retrained 16-bit modules are returned as copies beside the
quantized layers.
`FAST` skips distillation and shortens the search (minutes instead of hours; lower quality).
With a checkpoint every finished block is saved as a part and distillation after every epoch: an interrupted
run resumes with identical results.
Without calibration (`quantize_layers`, data-free) every layer minimises the plain weight error (H = I): a
clearly lower-quality fallback, used when no record is given or only weights are at hand.
"""
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..calib.replay import blocks_in_order, replay
from ..calib.statistics import collect_xtx
from ..distillation import dense_parameters, distill, retrained_modules
from ..errors import LowBitError
from ..layouts.vq import CODEBOOK_BITS, MAX_CODEBOOKS
from ..qlayers import make_quantized_layer, matrix_view, swap_modules
from ..vq_codec import fit_vq
from .base import Method, register_method

GROUP_SIZE = 8
# the "fast" switch (node, CLI, bench --fast): no distillation and a shortened codebook search (one beam round)
FAST = {"distill_epochs": 0, "max_rounds": 1, "beam_size": 4, "kmeans_iters": 10, "refit_iters": 10}
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
    distill_epochs: int = 8    # passes of distillation over the record's conditioning, fresh noise each (0: off)
    distill_lr: float = 3e-4   # Adam step relative to each tensor's mean magnitude (README: why not 1e-3)
    distill_batch_rows: int = 16  # batch rows per distillation step (a UNet call is split into such steps)
    distill_dense: bool = True  # distillation also trains the UNet's 16-bit parameters (norms, embeddings, ...)

    def __post_init__(self):
        if not 1 <= self.num_codebooks <= MAX_CODEBOOKS:
            raise LowBitError(f"VQ: num_codebooks {self.num_codebooks} must be 1..{MAX_CODEBOOKS}")
        if self.beam_size < 1 or self.max_rounds < 0 or self.refit_iters < 0 or self.kmeans_iters < 0:
            raise LowBitError("VQ: beam_size must be ≥ 1 and max_rounds / refit_iters / kmeans_iters ≥ 0")
        if self.distill_epochs < 0 or self.distill_lr <= 0 or self.distill_batch_rows < 1:
            raise LowBitError("VQ: distill_epochs must be ≥ 0, distill_lr > 0 and distill_batch_rows ≥ 1")

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


def fit_blockwise(unet, layers: dict, fit_layer, calibration, config: VQConfig, progress=None, resume=None) -> dict:
    """VQ's calibrated pipeline with any per-layer fit (method auto reuses it): block by block in execution order,
    XᵀX of the block's layers from the replayed record (earlier blocks quantized when `config.sequential`), then
    `fit_layer(name, module, hessian or None)` -> QuantizedLayer; then, with `config.distill_epochs`, the
    distillation of every quantized layer (and with `distill_dense` the 16-bit parameters) against the fp UNet.
    Returns the quantized layers and copies of the retrained 16-bit modules; resumable from `resume`."""
    if config.distill_epochs and any("x" not in call or "timesteps" not in call for call in calibration.inputs):
        raise LowBitError("distillation re-samples the calibration record's trajectories, which needs 'x' and "
                          "'timesteps' in every call; record with LowBitCalibrate, or skip distillation "
                          "(distill_epochs=0, the fast switch)")
    done = {} if resume is None else {name: layer.to(layers[name].weight.device)
                                      for name, layer in resume.load().items() if name in layers}
    quantized, replaced = {}, {}
    try:
        for block_name, block_layers in blocks_in_order(unet, layers).items():
            if all(name in done for name in block_layers):
                quantized.update({name: done[name] for name in block_layers})
                if progress:
                    progress(len(quantized), len(layers), f"{block_name} (resumed)")
            else:
                block = unet.get_submodule(block_name)
                hessians = collect_xtx(unet, block_layers,
                                       lambda: replay(unet, calibration.inputs, stop_after=block))
                for name, module in block_layers.items():
                    # a layer the replay never reached (nothing to measure) gets the data-free fit
                    quantized[name] = fit_layer(name, module, hessians.get(name))
                    if progress:
                        progress(len(quantized), len(layers), name)
                if resume is not None:
                    resume.save_part({name: quantized[name] for name in block_layers})
            if config.sequential:
                replaced.update(swap_modules(unet, {name: quantized[name] for name in block_layers}))
        retrained = {}
        if config.distill_epochs:
            replaced.update(swap_modules(unet, {n: q for n, q in quantized.items() if n not in replaced}))
            dense = dense_parameters(unet, quantized) if config.distill_dense else None
            _, trained = distill(unet, quantized, replaced, calibration, epochs=config.distill_epochs,
                                 lr=config.distill_lr, batch_rows=config.distill_batch_rows, seed=config.seed,
                                 progress=progress, checkpoint=resume, dense=dense)
            retrained = retrained_modules(unet, trained)
    finally:
        swap_modules(unet, replaced)
    return {**quantized, **retrained}


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
        def fit(name, module, hessian):
            return quantize_vq_layer(name, module, hessian, config)
        return fit_blockwise(unet, layers, fit, calibration, config, progress, resume)

    def describe(self, config) -> dict:
        return {**asdict(config), "format": config.name}
