import folder_paths
from comfy_api.latest import io

from ..quant_core import fileformat
from ..quant_core.errors import LowBitError
from .comfy_model import build_model, clip_and_vae


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
                                           "(LowBitSaveQuantizedUNet writes to output/diffusion_models); the "
                                           "UNet of a one-file LowBit checkpoint loads too.")],
            outputs=[io.Model.Output(tooltip="The quantized SDXL UNet as a MODEL for KSampler and other nodes.")],
        )

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        f = fileformat.load(path)
        return io.NodeOutput(build_model(f.layers, f.dense, f.info))


class LowBitCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitCheckpointLoader",
            display_name="Load LowBit Checkpoint",
            category="LowBit/loaders",
            description="Loads a one-file LowBit checkpoint (quantized UNet + CLIP + VAE, written by Save LowBit "
                        "Checkpoint or `python -m lowbit quantize --keep-clip-vae`); use it like Load Checkpoint.",
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                                   tooltip="A one-file LowBit .safetensors in a checkpoints folder.")],
            outputs=[io.Model.Output(tooltip="The quantized UNet as a MODEL."),
                     io.Clip.Output(tooltip="The text encoders stored in the file."),
                     io.Vae.Output(tooltip="The VAE stored in the file.")],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        f = fileformat.load(path)
        if sorted(f.bundled_parts) != ["clip", "vae"]:
            raise LowBitError(f"{ckpt_name} is a LowBit file with only the UNet{' and ' if f.bundled_parts else ''}"
                              f"{' and '.join(f.bundled_parts)}, not a one-file checkpoint: load it with Load LowBit "
                              "UNet and take CLIP and VAE from the original checkpoint (or save a one-file "
                              "checkpoint with Save LowBit Checkpoint)")
        model = build_model(f.layers, f.dense, f.info)
        clip, vae = clip_and_vae(f)
        return io.NodeOutput(model, clip, vae)
