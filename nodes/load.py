import folder_paths
from comfy_api.latest import io

from ..quant_core import fileformat
from .comfy_model import build_model


class LowBitLoadQuantizedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitLoadQuantizedUNet",
            display_name="Load LowBit UNet",
            category="LowBit/loaders",
            description="Loads a LowBit-quantized SDXL UNet; use it like the stock Load Diffusion Model node.",
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                                   tooltip="A LowBit .safetensors file in a diffusion_models folder "
                                           "(LowBitSaveQuantizedUNet writes to output/diffusion_models).")],
            outputs=[io.Model.Output(tooltip="The quantized SDXL UNet as a MODEL for KSampler and other nodes.")],
        )

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        f = fileformat.load(path)
        return io.NodeOutput(build_model(f.layers, f.dense, f.info))
