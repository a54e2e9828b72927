"""Weight rounding: which code each weight gets on an int_affine grid that is already fixed.

Every int_affine method (rtn, minmax, dgq, pcr) first builds its layers on its own grid (min-max or MSE-searched
scale and zero point per row or group) with round-to-nearest codes. `round_weights` then chooses the codes again
against the layers' inputs from the calibration record, leaving grid, file layout and kernels as they are:
- "nearest": nothing changes (data-free);
- "gptq": error-feedback rounding against each layer's XᵀX (lowbit.quant_core.weight_rounding.gptq);
- "adaround": learned rounding on the output of each UNet block, blocks in order (BRECQ-style reconstruction,
  lowbit.quant_core.weight_rounding.adaround).
Methods take the choice through `RoundingOptions`, keyword-only fields their configs inherit.
"""
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..calib.resume import record_digest
from ..errors import LowBitError
from .adaround import reconstruct
from .gptq import gptq_round
from .grid import grid_fingerprint

ROUNDINGS = ("nearest", "gptq", "adaround")
RECONSTRUCTION_INPUTS = ("quantized", "fp")


@dataclass(frozen=True, kw_only=True)
class RoundingOptions:
    """How an int_affine method rounds its weights (module docstring). adaround: `reconstruction_iterations`
    optimiser steps per block (the seeds use 2 000), block inputs from the model with the earlier blocks already
    quantized ("quantized", BRECQ's setting) or from the full-precision model ("fp"); targets are always the
    full-precision block's outputs; `learn_scales` learns the grid's scales with the rounding (stored in place of
    the min-max ones: same file format and bits); `activations_in_loop` runs the method's activation quantizers
    inside the optimisation (BRECQ's W·A setting; methods that quantize activations only)."""
    weight_rounding: str = "nearest"
    reconstruction_iterations: int = 2000
    reconstruction_inputs: str = "quantized"
    learn_scales: bool = False  # adaround: learn the grid's scales with the rounding
    activations_in_loop: bool = False  # adaround: the method's activation quantizers run in the optimisation

    def check_rounding(self, method: str) -> None:
        if self.weight_rounding not in ROUNDINGS:
            raise LowBitError(f"{method}: weight_rounding must be one of {ROUNDINGS} (got {self.weight_rounding!r})")
        if self.reconstruction_iterations < 1:
            raise LowBitError(f"{method}: reconstruction_iterations {self.reconstruction_iterations} must be >= 1")
        if self.reconstruction_inputs not in RECONSTRUCTION_INPUTS:
            raise LowBitError(f"{method}: reconstruction_inputs must be one of {RECONSTRUCTION_INPUTS} "
                              f"(got {self.reconstruction_inputs!r})")
        if self.learn_scales and self.weight_rounding != "adaround":
            raise LowBitError(f"{method}: learn_scales is part of block reconstruction: set "
                              f"weight_rounding='adaround' (got {self.weight_rounding!r}) or learn_scales=False")
        if self.activations_in_loop and self.weight_rounding != "adaround":
            raise LowBitError(f"{method}: activations_in_loop is part of block reconstruction: set "
                              f"weight_rounding='adaround' (got {self.weight_rounding!r}) or "
                              "activations_in_loop=False")


def round_weights(unet: Optional[nn.Module], layers: dict, quantized: dict, options: RoundingOptions, calibration,
                  method: str, progress=None, resume=None) -> None:
    """Re-round the codes of `quantized` (name -> int_affine layer built from `layers[name]`, not yet inside
    `unet`) with `options.weight_rounding`, in place. gptq and adaround replay the calibration record's calls on
    `unet` (which still holds the full-precision `layers`). With `resume` (the method's
    lowbit.quant_core.calib.resume.Checkpoint) adaround saves each finished block in a checkpoint shared beside it,
    keyed by the weights, the grids (`grid_fingerprint`), the record's content and the options rather than by the
    method, and takes finished blocks from it: an interrupted run resumes, and another method on the same grid
    (minmax, pcr, dgq and rtn per channel all build per-channel min-max grids) takes the codes instead of
    reconstructing again while the run keeps shared work."""
    if options.weight_rounding == "nearest" or not quantized:
        return
    if unet is None or calibration is None or len(calibration) == 0:
        raise LowBitError(f"{method}: weight_rounding={options.weight_rounding!r} needs the model and a calibration "
                          "record with recorded UNet calls (the layers' inputs); record calibration first or use "
                          "weight_rounding='nearest'")
    layers = {name: layers[name] for name in quantized}
    if options.activations_in_loop and not any(hasattr(layer, "act_meta") for layer in quantized.values()):
        raise LowBitError(f"{method} quantizes no activations: activations_in_loop needs minmax, dgq or pcr "
                          "(or set activations_in_loop=False)")
    if options.weight_rounding == "gptq":
        gptq_round(unet, layers, quantized, calibration.inputs, progress)
    else:
        shared = None if resume is None else resume.shared(
            "adaround", {"iterations": options.reconstruction_iterations, "inputs": options.reconstruction_inputs,
                         **({"learn_scales": True} if options.learn_scales else {}),
                         **({"activations_in_loop": True} if options.activations_in_loop else {})},
            layers, f"{grid_fingerprint(quantized, options.activations_in_loop)}|{record_digest(calibration.inputs)}")
        reconstruct(unet, layers, quantized, calibration.inputs, options, progress, shared)
