import os

import folder_paths
from comfy_api.latest import io

from ..quant_core import fileformat
from ..quant_core.errors import LowBitError
from .comfy_model import LOWBIT_ATTR, stored_state


class LowBitSaveQuantizedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitSaveQuantizedUNet",
            display_name="Save LowBit UNet",
            category="LowBit/save",
            description="Saves a LowBit MODEL as one .safetensors under output/diffusion_models (never overwrites).",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL produced by LowBitQuantizeUNet or LowBitLoadQuantizedUNet."),
                io.String.Input("filename_prefix", default="lowbit/sdxl",
                                tooltip="Path under output/diffusion_models; a counter is appended so no file "
                                        "is overwritten."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the written file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        info = getattr(model.model, LOWBIT_ATTR, None)
        if info is None:
            raise LowBitError("this MODEL is not LowBit-quantized; pass it through LowBitQuantizeUNet first")
        unet = model.model.diffusion_model
        layers = {name: m for name, m in unet.named_modules() if isinstance(m, fileformat.QuantizedLayer)}
        tensors, table = fileformat.file_tensors(layers, stored_state(model, layers))
        header = info.to_json(table)
        root = os.path.join(folder_paths.get_output_directory(), "diffusion_models")
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        fileformat.save(path, tensors, header)
        return io.NodeOutput(path, ui={"text": [path]})
