import os

import folder_paths
from comfy_api.latest import io

from ..quant_core import fileformat
from ..quant_core.errors import LowBitError
from .comfy_model import LOWBIT_ATTR, checkpoint_parts, stored_state


def save_lowbit(model, filename_prefix: str, folder: str, clip=None, vae=None) -> str:
    """Write a LowBit MODEL (with `clip` and `vae`: a one-file checkpoint) under output/<folder>, never
    overwriting (a counter is appended); the path written."""
    info = getattr(model.model, LOWBIT_ATTR, None)
    if info is None:
        raise LowBitError("this MODEL is not LowBit-quantized; pass it through LowBitQuantizeUNet first")
    unet = model.model.diffusion_model
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, fileformat.QuantizedLayer)}
    tensors, table = fileformat.file_tensors(layers, stored_state(model, layers))
    header = info.to_json(table)
    if clip is not None or vae is not None:
        tensors, header = fileformat.bundle(tensors, header, checkpoint_parts(model, clip, vae))
    root = os.path.join(folder_paths.get_output_directory(), folder)
    out_folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, root)
    os.makedirs(out_folder, exist_ok=True)
    path = os.path.join(out_folder, f"{name}_{counter:05}_.safetensors")
    fileformat.save(path, tensors, header)
    return path


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
        path = save_lowbit(model, filename_prefix, "diffusion_models")
        return io.NodeOutput(path, ui={"text": [path]})


class LowBitSaveCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitSaveCheckpoint",
            display_name="Save LowBit Checkpoint",
            category="LowBit/save",
            description="Saves a LowBit MODEL with its CLIP and VAE (16-bit) as one .safetensors under "
                        "output/checkpoints, for sharing one file; load it with Load LowBit Checkpoint.",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL produced by LowBitQuantizeUNet or a LowBit loader."),
                io.Clip.Input("clip", tooltip="The text encoders to store with it (as the stock checkpoint "
                                              "saver does: LoRA patches on the CLIP are baked in)."),
                io.Vae.Input("vae", tooltip="The VAE to store with it."),
                io.String.Input("filename_prefix", default="lowbit/sdxl",
                                tooltip="Path under output/checkpoints; a counter is appended so no file is "
                                        "overwritten."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the written file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix) -> io.NodeOutput:
        path = save_lowbit(model, filename_prefix, "checkpoints", clip, vae)
        return io.NodeOutput(path, ui={"text": [path]})
