import logging
import time

from comfy_api.latest import io

from ..quant_core.api import quantize_layers_of
from ..quant_core.methods import get_method
from ..quant_core.layouts.int_affine import SUPPORTED_BITS
from .comfy_model import build_model, check_sdxl_model, dense_state, source_layers
from .progress import comfy_progress


class LowBitQuantizeUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitQuantizeUNet",
            display_name="Quantize UNet (LowBit)",
            category="LowBit/quantize",
            description="Quantizes an SDXL MODEL's UNet; the input MODEL is left unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL MODEL (e.g. from Load Checkpoint); weight patches such "
                                                "as LoRA already applied to it are baked into the result."),
                io.Combo.Input("method", options=["rtn"], default="rtn",
                               tooltip="rtn: round-to-nearest weight-only (the data-free baseline)."),
                io.Int.Input("bits", default=4, min=min(SUPPORTED_BITS), max=max(SUPPORTED_BITS),
                             tooltip=f"Weight bits; supported: {', '.join(map(str, SUPPORTED_BITS))}."),
                io.Int.Input("group_size", default=128, min=0, max=4096, step=8,
                             tooltip="Weights sharing one range (multiple of 8); 0 = one range per output "
                                     "channel. 128 is a good default for 4 bits."),
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
    def execute(cls, model, method, bits, group_size) -> io.NodeOutput:
        unet_config = check_sdxl_model(model)
        quant_method = get_method(method)
        config = quant_method.config_type(bits=bits, group_size=group_size)
        layers = source_layers(model)
        logging.info(f"LowBit: quantizing {len(layers)} layers with {method} {config}")
        t0 = time.perf_counter()
        qlayers = quantize_layers_of(None, layers, config, progress=comfy_progress())
        logging.info(f"LowBit: quantized in {time.perf_counter() - t0:.1f} s")
        info = {"method": method, "method_config": quant_method.describe(config), "arch": unet_config.pop("arch"),
                "unet_config": unet_config}
        out = build_model(qlayers, dense_state(model, qlayers, with_patches=True), info,
                          model_config=model.model.model_config)
        out.model_options = model.clone().model_options  # keep the MODEL's sampler/attention patches
        return io.NodeOutput(out)
