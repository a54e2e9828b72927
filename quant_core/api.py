"""The one verb: `quantize(unet, config)` replaces the selected layers of a UNet by quantized ones."""
from typing import Optional

from torch import nn

from .methods import Method, ProgressFn, method_for_config
from .resume import LayerCheckpoint, quantize_in_parts
from .selection import select_layers


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_layers_of(unet: Optional[nn.Module], layers: dict, config, calibration=None,
                       progress: Optional[ProgressFn] = None, checkpoint: Optional[LayerCheckpoint] = None) -> dict:
    """name -> QuantizedLayer for `layers` (name -> module); `unet` is None when only weights are at hand.
    With `checkpoint`, methods whose layers are independent (no model run) save finished layers as they go
    and skip those a previous, interrupted run finished; methods that run the model keep their own
    checkpoints (PCR: its config's `checkpoint` file)."""
    method = method_for_config(config)
    independent = unet is None or type(method).quantize_model is Method.quantize_model
    if independent and checkpoint is not None:
        return quantize_in_parts(lambda chunk, p: method.quantize_layers(chunk, config, calibration, p), layers,
                                 checkpoint, progress=progress)
    if unet is None:
        return method.quantize_layers(layers, config, calibration, progress)
    return method.quantize_model(unet, layers, config, calibration, progress)


def quantize_layers(unet: nn.Module, config, calibration=None, progress: Optional[ProgressFn] = None) -> dict:
    """name -> QuantizedLayer for the selected layers of `unet` (the UNet itself is left unchanged)."""
    return quantize_layers_of(unet, select_layers(unet), config, calibration, progress)


def quantize(unet: nn.Module, config, calibration=None, progress: Optional[ProgressFn] = None) -> nn.Module:
    """Quantize `unet` in place with the method `config` belongs to; returns it."""
    for name, layer in quantize_layers(unet, config, calibration, progress).items():
        set_submodule(unet, name, layer)
    return unet
