import logging

from comfy_api.latest import io

from ..testbed.model import TESTBED_WEIGHTS, WEIGHTS_DIR, comfy_testbed_objects, read_metadata


def testbed_weight_files() -> list[str]:
    """The testbed model files shipped in testbed/weights (safetensors whose metadata describes a UNet)."""
    names = []
    for path in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        try:
            if "unet" in read_metadata(path):
                names.append(path.name)
        except Exception as e:  # a broken file is not offered; the others still are
            logging.warning(f"LowBit: skipping testbed weights {path.name}: {e}")
    return names or [TESTBED_WEIGHTS.name]


class LowBitTestbedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = testbed_weight_files()
        return io.Schema(
            node_id="LowBitTestbedLoader",
            display_name="Load LowBit Testbed",
            category="LowBit/testbed",
            description="Loads the small trained testbed shipped with LowBit (SDXL-structured UNet, 32x32 RGB "
                        "shapes, its own text encoder and a lossless pixel 'VAE') as MODEL, CLIP and VAE for the "
                        "stock nodes. Use EmptyLatentImage 32x32 and prompts such as "
                        "'a small red circle top left on green'.",
            inputs=[io.Combo.Input("weights", options=files,
                                   default=TESTBED_WEIGHTS.name if TESTBED_WEIGHTS.name in files else files[0],
                                   tooltip="Testbed weights from the pack's testbed/weights folder "
                                           "(testbed.safetensors: trained by testbed/train.py).")],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The testbed UNet for KSampler and LowBit's quantize/compare nodes."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="The testbed text encoder for the stock CLIPTextEncode; it knows only the "
                                       "dataset's words (colours, shapes, sizes, positions, backgrounds)."),
                io.Vae.Output(display_name="VAE",
                              tooltip="Exact pixel rearrangement (no autoencoder): VAEDecode gives the 32x32 image."),
            ],
        )

    @classmethod
    def validate_inputs(cls, weights, **kwargs):
        if weights not in testbed_weight_files():
            return f"testbed weights {weights!r} not found in {WEIGHTS_DIR}"
        return True

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        model, clip, vae = comfy_testbed_objects(WEIGHTS_DIR / weights)
        return io.NodeOutput(model, clip, vae)
