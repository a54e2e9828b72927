"""LowBit MODELs with stock ComfyUI weight patching (LoRA), partial (lowvram) loading and memory accounting,
in-process on a tiny SDXL-structure UNet (real ComfyUI code paths, no server)."""
import copy

import pytest
import torch

from helpers.comfy_env import import_comfy


@pytest.fixture(scope="module")
def base():
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models_base
    from helpers.fixtures import TINY_SDXL_UNET_CONFIG, tiny_sdxl_unet
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    config = comfy.supported_models_base.BASE(dict(TINY_SDXL_UNET_CONFIG))
    config.unet_extra_config = {}
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(tiny_sdxl_unet(0).state_dict())
    fp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    return LowBitQuantizeUNet.execute(fp, "rtn", 4, 32).result[0]


@pytest.fixture(scope="module")
def inputs():
    from helpers.fixtures import tiny_unet_inputs
    return tiny_unet_inputs()


LORA_LAYERS = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in",
               "output_blocks.3.0.in_layers.2", "output_blocks.5.1.transformer_blocks.0.ff.net.2"]


def kohya_lora(unet, seed, rank=4, alpha=2.0):
    """A LoRA in kohya's SDXL key format (lora_unet_<ldm name with underscores>) for LORA_LAYERS."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in LORA_LAYERS:
        shape = unet.get_submodule(name).weight_shape
        key = "lora_unet_" + name.replace(".", "_")
        if len(shape) == 4:
            down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g) * 0.1
            up = torch.randn(shape[0], rank, 1, 1, generator=g) * 0.1
        else:
            down = torch.randn(rank, shape[1], generator=g) * 0.1
            up = torch.randn(shape[0], rank, generator=g) * 0.1
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    return sd


def lora_delta(lora, name, shape, rank=4):
    key = "lora_unet_" + name.replace(".", "_")
    down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
    scale = lora[f"{key}.alpha"].item() / rank
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def reference_unet(patcher, loras):
    """Independent reference: a dense copy of the UNet whose quantized layers hold dequantized weights plus
    strength x LoRA delta, computed here without ComfyUI's patch code."""
    from lowbit.quant_core.api import set_submodule
    from lowbit.quant_core.qlayers import QuantizedLayer
    unet = copy.deepcopy(patcher.model.diffusion_model)
    for name, m in list(unet.named_modules()):
        if isinstance(m, QuantizedLayer):
            w = m.dequantize_weight()
            for lora, strength in loras:
                if name in LORA_LAYERS:
                    w = w + strength * lora_delta(lora, name, w.shape)
            dense = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=m.stride, padding=m.padding) \
                if w.dim() == 4 else torch.nn.Linear(w.shape[1], w.shape[0])
            dense.weight.data, dense.bias = w, None if m.bias is None else torch.nn.Parameter(m.bias.float())
            set_submodule(unet, name, dense)
    return unet


def run(patcher, inputs, lowvram_bytes=0):
    import comfy.model_management
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=lowvram_bytes)
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(**inputs)
    finally:
        patcher.unpatch_model(torch.device("cpu"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_stock_lora_applies_exactly_stacks_and_unloads(base, inputs):
    import comfy.sd
    lora_a, lora_b = kohya_lora(base.model.diffusion_model, 1), kohya_lora(base.model.diffusion_model, 2)
    plain = run(base, inputs)
    with_a = comfy.sd.load_lora_for_models(base, None, lora_a, 0.8, 0)[0]
    assert sum(k.startswith("diffusion_model.") for k in with_a.patches) == len(LORA_LAYERS)
    out_a = run(with_a, inputs)
    with torch.no_grad():
        ref_a = reference_unet(base, [(lora_a, 0.8)])(**inputs)
    assert rel(out_a, ref_a) < 1e-5 and rel(out_a, plain) > 1e-3
    both = comfy.sd.load_lora_for_models(with_a, None, lora_b, -0.5, 0)[0]
    with torch.no_grad():
        ref_ab = reference_unet(base, [(lora_a, 0.8), (lora_b, -0.5)])(**inputs)
    assert rel(run(both, inputs), ref_ab) < 1e-5
    zero = comfy.sd.load_lora_for_models(base, None, lora_a, 0.0, 0)[0]
    assert torch.equal(run(zero, inputs), plain)
    assert torch.equal(run(base, inputs), plain)  # the LoRA is gone when the plain MODEL loads again


def test_lowvram_partial_load_gives_same_output(base, inputs):
    import comfy.sd
    full = run(base, inputs)
    partial = run(base, inputs, lowvram_bytes=1)  # nothing fits: every layer cast at forward time
    assert torch.equal(partial, full)
    lora = comfy.sd.load_lora_for_models(base, None, kohya_lora(base.model.diffusion_model, 3), 1.0, 0)[0]
    assert rel(run(lora, inputs, lowvram_bytes=1), run(lora, inputs)) < 1e-6


def test_model_management_sees_true_size(base):
    from lowbit.quant_core.fileformat import module_summary
    summary = module_summary(base.model.diffusion_model)
    packed = sum(m.packed_bytes() for m in base.model.diffusion_model.modules() if hasattr(m, "packed_bytes"))
    dense = summary["total_bytes"] - packed  # the 16-bit rest, held in 16 bits also on CPU (fp32 compute)
    assert base.model_size() == pytest.approx(packed + dense, rel=0.02)
    assert base.model_size() < 0.5 * 4 * summary["total_params"]
