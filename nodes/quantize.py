import logging
import os
import time

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..quant_core.api import quantize_layers_of
from ..quant_core.qlayers import split_result
from ..quant_core.errors import LowBitError
from ..quant_core.fileformat import Header
from ..quant_core.layouts.int_affine import SUPPORTED_BITS
from ..quant_core.methods import config_from, get_method
from ..quant_core.methods.auto import with_size_target
from ..quant_core.selection import choose_layers, select_layers
from ..testbed.model import TESTBED_MODEL_CLASS, is_testbed_model
from .comfy_model import UNetSource, build_model, sampling_of
from .options import QuantOptions
from .progress import comfy_progress
from .types import Calibration, Options

METHODS = ["rtn", "vq", "dgq", "pcr", "minmax", "auto"]
CHECKPOINT_FOLDER = "lowbit_checkpoints"


def method_config(method: str, bits: int, group_size: int, options: QuantOptions):
    """The method's config dataclass: RTN from the bits/group_size widgets, minmax from bits (A8), both with the
    weight rounding of LowBitRoundingOptions, the others from their options node (their defaults when none is
    connected)."""
    if options.method != method:
        raise LowBitError(f"LowBitQuantizeUNet: the connected options are for {options.method} but method is "
                          f"{method}; set method to {options.method} or connect {method}'s options node")
    if method == "rtn":
        return config_from("rtn", bits=bits, group_size=group_size, **options.config)
    if method == "minmax":
        return config_from("minmax", weight_bits=bits, act_bits=8, **options.config)
    return config_from(method, **options.config)


class LowBitQuantizeUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitQuantizeUNet",
            display_name="Quantize UNet (LowBit)",
            category="LowBit/quantize",
            description="Quantizes an SDXL MODEL's UNet; the input MODEL is left unchanged. Interrupted runs resume "
                        "from a checkpoint under output/lowbit_checkpoints when queued again.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL MODEL (e.g. from Load Checkpoint); weight patches such "
                                                "as LoRA already applied to it are baked into the result."),
                io.Combo.Input("method", options=METHODS, default="rtn",
                               tooltip="rtn: round-to-nearest weights (data-free baseline). vq: vector "
                                       "quantization, 2-4 bits (calibration optional, better with it). dgq / pcr: "
                                       "weights + activations (need calibration). minmax: naive W·A8 baseline "
                                       "(needs calibration). auto: a format per layer at a target size (mixed "
                                       "precision, LowBitAutoOptions). Method settings come from its options node."),
                io.Int.Input("bits", default=4, min=min(SUPPORTED_BITS), max=max(SUPPORTED_BITS),
                             tooltip=f"Weight bits of rtn and minmax ({', '.join(map(str, SUPPORTED_BITS))}); "
                                     "the other methods take theirs from their options node."),
                io.Int.Input("group_size", default=128, min=0, max=4096, step=8,
                             tooltip="rtn only: weights sharing one range (multiple of 8); 0 = one range per "
                                     "output channel. 128 is a good default for 4 bits."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="A record from LowBitCalibrate: needed by dgq, pcr and minmax, makes vq "
                                          "Hessian-aware; used by rtn only with gptq/adaround rounding."),
                Options.Input("options", optional=True,
                              tooltip="Settings from the method's options node (defaults when empty); rtn and "
                                      "minmax take LowBitRoundingOptions."),
            ],
            outputs=[io.Model.Output(tooltip="The quantized MODEL; save it with LowBitSaveQuantizedUNet.")],
        )

    @classmethod
    def validate_inputs(cls, bits, group_size, **kwargs):
        if bits not in SUPPORTED_BITS:
            return f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}"
        if group_size % 8:
            return f"group_size={group_size} must be 0 or a multiple of 8"
        return True

    @classmethod
    def execute(cls, model, method, bits, group_size, calibration=None, options=None) -> io.NodeOutput:
        source = UNetSource.read(model)
        testbed = is_testbed_model(model.model)
        sampling = None if testbed else sampling_of(model)  # before the work: a MODEL it cannot record fails now
        quant_method = get_method(method)
        options = options or QuantOptions(method)
        config = method_config(method, bits, group_size, options)
        if quant_method.needs_calibration and calibration is None:
            raise LowBitError(f"LowBitQuantizeUNet: {method} needs calibration data; connect a LowBitCalibrate "
                              "node to the calibration input")
        record = None if calibration is None or not quant_method.runs_model(config) else calibration.load()
        if record is not None:
            # the methods run the UNet itself; loading applies the MODEL's weight patches (LoRA) to it, and
            # every method restores the modules it swaps, so the MODEL computes what it did before
            comfy.model_management.load_models_gpu([model])
            unet = model.model.diffusion_model
            layers = choose_layers(select_layers(unet), options.layers)
        else:
            unet, layers = None, choose_layers(source.layers, options.layers)
        if getattr(config, "target_gb", 0):  # auto at a file size: the MODEL's 16-bit rest is known here
            config = with_size_target(config, layers, source.dense(layers))
        described = quant_method.describe(config)
        logging.info(f"LowBit: quantizing {len(layers)} layers with {method} {described}"
                     + (f" on {len(record)} calibration calls" if record is not None else " (data-free)"))
        t0 = time.perf_counter()
        # resumable: an interrupted run goes on from its checkpoint under output/lowbit_checkpoints when
        # queued again (PCR re-samples the record's own trajectories: the API's default sampler)
        qlayers, retrained = split_result(quantize_layers_of(
            unet, layers, config, record, progress=comfy_progress("quantize"),
            resume=os.path.join(folder_paths.get_output_directory(), CHECKPOINT_FOLDER),
            calibration_id=calibration.path if record is not None else ""))
        logging.info(f"LowBit: quantized in {time.perf_counter() - t0:.1f} s")
        unet_config = dict(source.unet_config)
        info = Header(method, described, unet_config.pop("arch"), unet_config,
                      model_class=TESTBED_MODEL_CLASS if testbed else None, sampling=sampling)
        dense = source.dense(qlayers)  # VQ's distillation retrains 16-bit tensors (norms, ...): those replace them
        dense.update({key: tensor.to(dense[key].dtype) for key, tensor in retrained.items()})
        out = build_model(qlayers, dense, info, model_config=model.model.model_config)
        out.model_options = model.clone().model_options  # keep the MODEL's sampler/attention patches
        return io.NodeOutput(out)
