"""Activation quantization shared by the weight+activation methods (minmax, DGQ, PCR).

- quantizers: asymmetric uniform fake quantization, the logarithmic quantizer for softmax probabilities;
- observers: per-slice min/max and moving-average min/max gathered with forward hooks;
- grouping: DGQ's axis choice and deterministic k-means grouping of slices;
- params: per-timestep parameter sets of one quantized tensor, nearest-timestep selection, resolution rule;
- context: `bind(unet)` makes the current timestep (and the softmax hook) reach the layers;
- layers: ActQuantLinear / ActQuantConv2d, simulated or real (integer) execution.

A UNet holding activation-quantized layers must be bound (`bind(unet)`) before it runs with per-timestep
parameters; the methods bind the UNet they quantize, `prepare_unet` binds any UNet that needs it.
"""
from .context import bind
from .layers import ActQuantConv2d, ActQuantLinear, execution, execution_mode
from .params import ActParams

__all__ = ["bind", "prepare_unet", "ActQuantLinear", "ActQuantConv2d", "ActParams", "execution",
           "execution_mode"]


def prepare_unet(unet):
    """Bind `unet` if it holds activation-quantized layers (what a loader calls after installing layers)."""
    if any(isinstance(m, (ActQuantLinear, ActQuantConv2d)) for m in unet.modules()):
        bind(unet)
    return unet
