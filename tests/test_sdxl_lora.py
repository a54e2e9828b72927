"""Stock LoRA loading on full-size (random) SDXL LowBit MODELs, in-process through ComfyUI's own LoraLoaderModelOnly:
a W4 MODEL (RTN, every layer) and a VQ MODEL (2x8g8, data-free, on the LoRA'd layers, as CPU runs restrict VQ).
conftest runs this module after every server test: it holds a 16-bit SDXL UNet and two quantized copies."""
import pytest
import torch
from safetensors.torch import save_file

from helpers import lora as lora_helpers
from helpers.comfy_env import comfy_nodes, import_comfy

pytestmark = [pytest.mark.slow]

# one layer of each kind a kohya SDXL LoRA touches: self-attention, resblock conv, proj_in, feed-forward out
LORA_LAYERS = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2",
               "middle_block.1.proj_in", "output_blocks.2.1.transformer_blocks.1.ff.net.2"]
STRENGTH_A, STRENGTH_B = 0.8, -0.5


@pytest.fixture(scope="module")
def models(sdxl_ckpt, tmp_path_factory):
    """{"w4": MODEL, "vq": MODEL} and the LoRA file names (in a `loras` folder registered with ComfyUI)."""
    import_comfy()
    import comfy.sd
    import folder_paths
    from lowbit.nodes.options import LowBitVQOptions
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    fp = comfy.sd.load_checkpoint_guess_config(str(sdxl_ckpt), output_vae=False, output_clip=False,
                                               model_options={"dtype": torch.float16})[0]
    w4 = LowBitQuantizeUNet.execute(fp, "rtn", 4, 128).result[0]
    pattern = "|".join(name.replace(".", r"\.") for name in LORA_LAYERS)
    vq_options = LowBitVQOptions.execute("2x8g8", 2, 1, 0, True, False, 0, f"^({pattern})$").result[0]
    vq = LowBitQuantizeUNet.execute(fp, "vq", 4, 0, None, vq_options).result[0]
    del fp
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras))
    files = {}
    for label, seed in (("a", 1), ("b", 2)):
        sd = lora_helpers.kohya_lora(w4.model.diffusion_model, seed, LORA_LAYERS)
        save_file(sd, str(loras / f"lowbit_test_{label}.safetensors"))
        files[label] = (f"lowbit_test_{label}.safetensors", sd)
    yield {"w4": w4, "vq": vq}, files
    import comfy.model_management
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, 4, 8, 8, generator=g), "timesteps": torch.tensor([500.0]),
            "context": torch.randn(1, 77, 2048, generator=g), "y": torch.randn(1, 2816, generator=g)}


def unet_out(patcher, inputs):
    """The UNet output after ComfyUI loads the MODEL as sampling does (weight patches attached on load)."""
    import comfy.model_management
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model(**inputs)


def reference_out(patcher, loras, inputs):
    with torch.no_grad(), lora_helpers.dense_reference(patcher.model.diffusion_model, LORA_LAYERS, loras) as unet:
        return unet(**inputs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["w4", "vq"])
def test_stock_lora_loader_on_full_size_lowbit_models(models, inputs, kind):
    from lowbit.quant_core.qlayers import QuantizedLayer
    lowbit_models, files = models
    model = lowbit_models[kind]
    unet = model.model.diffusion_model
    assert all(isinstance(unet.get_submodule(name), QuantizedLayer) for name in LORA_LAYERS)
    loader = comfy_nodes().LoraLoaderModelOnly
    (name_a, lora_a), (name_b, lora_b) = files["a"], files["b"]
    plain = unet_out(model, inputs)
    with_a = loader().load_lora_model_only(model, name_a, STRENGTH_A)[0]
    assert sum(k.startswith("diffusion_model.") for k in with_a.patches) == len(LORA_LAYERS)
    out_a = unet_out(with_a, inputs)
    assert rel(out_a, reference_out(model, [(lora_a, STRENGTH_A)], inputs)) < 1e-5
    assert rel(out_a, plain) > 1e-3
    both = loader().load_lora_model_only(with_a, name_b, STRENGTH_B)[0]
    assert rel(unet_out(both, inputs), reference_out(model, [(lora_a, STRENGTH_A), (lora_b, STRENGTH_B)], inputs)) \
        < 1e-5
    import comfy.sd
    zero = comfy.sd.load_lora_for_models(model, None, lora_a, 0.0, 0)[0]  # patches present, strength 0
    assert torch.equal(unet_out(zero, inputs), plain)
    assert loader().load_lora_model_only(model, name_a, 0.0)[0] is model  # the stock node's own shortcut
    # no requantization: the packed tensors are untouched, and the plain MODEL loads without the LoRA again
    assert torch.equal(unet_out(model, inputs), plain)
