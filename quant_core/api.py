"""The one verb: `quantize(unet, config)` replaces the selected layers of a UNet by quantized ones."""
from typing import Optional

from torch import nn

from .calib.resume import Checkpoint, quantize_in_parts
from .calib.trajectory import trajectory_sampler
from .errors import LowBitError
from .methods import ProgressFn, method_for_config
from .qlayers import set_submodule
from .selection import choose_layers, select_layers


def _default_sampler(method: str, calibration):
    """sampler(unet) re-running the record's own trajectories, for methods that sample (PCR)."""
    try:
        return trajectory_sampler(calibration)
    except (LowBitError, TypeError, AttributeError) as e:
        raise LowBitError(f"{method} samples during calibration: pass sampler= (a callable sampler(unet) running "
                          f"the calibration prompts) or a record whose trajectories can be re-run ({e})") from None


def quantize_layers_of(unet: Optional[nn.Module], layers: dict, config, calibration=None,
                       progress: Optional[ProgressFn] = None, resume: Optional[str] = None, sampler=None,
                       calibration_id: str = "", keep_rounding: bool = False) -> dict:
    """name -> QuantizedLayer for `layers` (name -> module); `unet` is None when only weights are at hand. VQ's
    distillation also returns copies of the 16-bit modules it retrained (norms, embeddings: plain modules beside
    the QuantizedLayers; lowbit.quant_core.qlayers.split_result tells them apart).

    resume: a folder; the run keeps its checkpoint in a subfolder named by the method, its config, the layers'
    weights and `calibration_id` (lowbit.quant_core.calib.resume), continues from what an interrupted run
    left there and removes it once done. Methods with independent layers save finished layers in parts;
    methods that run the model save their own state there (PCR). AdaRound's codes go to a folder beside it keyed
    by weights, grids, record and options (lowbit.quant_core.weight_rounding.round_weights); `keep_rounding`
    keeps that folder after the run, so another int_affine method on the same grid and record (minmax, pcr, dgq,
    rtn per channel) takes the codes instead of reconstructing again (bench runs; on SDXL it holds the codes of
    every quantized weight, ~1.3 GB at 4 bits).
    sampler: for methods that sample during calibration (PCR): a callable sampler(unet); default: the record's
    own trajectories re-run (lowbit.quant_core.calib.trajectory.trajectory_sampler)."""
    method = method_for_config(config)
    checkpoint = None if resume is None else Checkpoint.for_run(resume, method.name, method.describe(config),
                                                                layers, calibration_id, keep_rounding)
    if (unet is None or not method.runs_model(config)) and not method.joint_layers:
        def run(chunk, chunk_progress):
            return method.quantize_layers(chunk, config, calibration, chunk_progress)
        result = run(layers, progress) if checkpoint is None else quantize_in_parts(run, layers, checkpoint,
                                                                                    progress)
    else:
        if method.needs_sampler and sampler is None:
            sampler = _default_sampler(method.name, calibration)
        result = method.quantize_model(unet, layers, config, calibration, progress, sampler=sampler,
                                       resume=checkpoint)
    if checkpoint is not None:
        checkpoint.clear()
    return result


def quantize_layers(unet: nn.Module, config, calibration=None, layers=None, **options) -> dict:
    """name -> QuantizedLayer for the selected layers of `unet` (the UNet itself is left unchanged).
    layers: which of the selectable layers (None = all, a regular expression on names, or a callable(name,
    module) -> bool); options: progress, resume, sampler, calibration_id, keep_rounding (quantize_layers_of)."""
    return quantize_layers_of(unet, choose_layers(select_layers(unet), layers), config, calibration, **options)


def quantize(unet: nn.Module, config, calibration=None, layers=None, **options) -> nn.Module:
    """Quantize `unet` in place with the method `config` belongs to; returns it. Arguments as quantize_layers."""
    for name, layer in quantize_layers(unet, config, calibration, layers, **options).items():
        set_submodule(unet, name, layer)
    return unet
