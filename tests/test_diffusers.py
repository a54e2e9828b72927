"""LowBit files in diffusers (issue 18, first part): the LDM -> diffusers name map, the UNet2DConditionModel config
derived from a file's shapes, and the same file computing the same output in ComfyUI's UNetModel and in diffusers'
UNet2DConditionModel. Offline: configs come from the files, nothing from the hub."""
import pytest
import torch

from lowbit.quant_core import fileformat
from lowbit.quant_core.api import quantize
from lowbit.quant_core.errors import LowBitError
from lowbit.quant_core.methods import config_from
from lowbit.quant_core.qlayers import set_submodule
from lowbit.quant_core.selection import select_layers

pytestmark = pytest.mark.usefixtures("comfy_env_module")
SDXL_PARAMS = 2_567_463_684


def meta_unet(variant="base"):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from lowbit.bench.sdxl_random import variant_unet_config
    return UNetModel(**variant_unet_config(variant), device="meta", operations=comfy.ops.disable_weight_init)


def test_sdxl_names_match_comfyui_and_diffusers():
    """Every LowBit layer of SDXL gets the diffusers name ComfyUI's unet_to_diffusers gives it; every tensor of
    the UNet maps onto a tensor of the same shape in diffusers' UNet2DConditionModel built from the derived config,
    which is stabilityai's SDXL config (2 567 463 684 parameters); the 11 layers diffusers' converter addresses by
    exact key (conv_in, the down/upsample convs, time and label embeddings, out) map as expected."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from lowbit.bench.sdxl_random import SDXL_UNET_CONFIG
    from lowbit.diffusers_glue.config import SDXL_BASE_CONFIG, diffusers_config
    from lowbit.diffusers_glue.names import diffusers_names
    unet = meta_unet()
    sd = unet.state_dict()
    names = diffusers_names(sd)
    comfy_names = {ldm: d for d, ldm in comfy.utils.unet_to_diffusers(SDXL_UNET_CONFIG).items()}
    layers = select_layers(unet)
    assert len(layers) == 771
    for name in layers:
        for key in (k for k in (name + ".weight", name + ".bias") if k in sd):  # to_q/k/v have no bias
            assert names[key] == comfy_names[key]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    config = diffusers_config(shapes)
    assert config == SDXL_BASE_CONFIG
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert sum(torch.Size(s).numel() for s in expected.values()) == SDXL_PARAMS
    assert {names[k]: s for k, s in shapes.items()} == expected
    exact = {"input_blocks.0.0": "conv_in", "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
             "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv", "output_blocks.2.2.conv":
             "up_blocks.0.upsamplers.0.conv", "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
             "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "out.0": "conv_norm_out", "out.2": "conv_out"}
    for ldm, name in exact.items():
        assert names[ldm + ".weight"] == name + ".weight" and names[ldm + ".bias"] == name + ".bias"


@pytest.mark.parametrize("variant", ["refiner", "inpaint", "instruct-pix2pix", "koala-1b"])
def test_variant_configs_hold_every_tensor(variant):
    from diffusers import UNet2DConditionModel
    from lowbit.diffusers_glue.config import diffusers_config
    from lowbit.diffusers_glue.names import diffusers_names
    shapes = {k: tuple(v.shape) for k, v in meta_unet(variant).state_dict().items()}
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(diffusers_config(shapes))
    names = diffusers_names(shapes)
    assert {names[k]: s for k, s in shapes.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _file(tmp_path, method_config, name, calibration=None, layers=None):
    from helpers.fixtures import tiny_sdxl_unet
    unet = quantize(tiny_sdxl_unet(0), method_config, calibration, layers=layers)
    tensors, table = fileformat.unet_tensors(unet)
    return fileformat.save(tmp_path / f"{name}.safetensors", tensors,
                           fileformat.Header(name, {}, "sdxl-family").to_json(table))


@pytest.mark.parametrize("method", ["rtn", "vq"])
def test_the_same_file_computes_the_same_output_in_both_hosts(tmp_path, method):
    """A tiny SDXL-structure UNet quantized and saved; loaded into ComfyUI's UNetModel (as the LowBit loader does)
    and into diffusers by load_unet; the same latent, timesteps, text and size conditioning (diffusers assembles
    the size vector itself; ComfyUI is handed the same vector) give outputs equal to float32 rounding (the two
    hosts order attention and normalisation arithmetic differently: measured ~1e-6 relative)."""
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.diffusers_glue.config import diffusers_config
    from lowbit.diffusers_glue.unet import load_unet, logical_shapes
    from lowbit.quant_core.methods.vq import FAST
    config = (config_from("rtn", bits=4, group_size=32) if method == "rtn"
              else config_from("vq", format="2x8g8", **FAST))
    # VQ: the layers of the middle and last output blocks (convs and linears) keep the test short
    path = _file(tmp_path, config, method, layers=None if method == "rtn" else r"middle_block|output_blocks\.8")
    f = fileformat.load(path)
    comfy_unet = tiny_sdxl_unet(0)
    for name, layer in f.layers.items():
        set_submodule(comfy_unet, name, layer)
    comfy_unet.load_state_dict({k: v.float() for k, v in f.dense.items()}, strict=False)
    # the tiny UNet: 16-channel heads, 8 numbers per size id (6 ids + 48 pooled = its 96-wide label input)
    unet = load_unet(path, dtype=torch.float32, config=diffusers_config(logical_shapes(f), 16, 8))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, 64, generator=g)
    t, pooled = torch.tensor([10.0, 700.0]), torch.randn(2, 48, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48.0, 64, 8, 0, 64, 48]])
    y = torch.cat([pooled, unet.add_time_proj(ids.flatten()).reshape(2, -1)], dim=1)
    with torch.no_grad():
        expected = comfy_unet(x, timesteps=t, context=context, y=y)
        out = unet(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_activation_quantized_files_are_refused(tmp_path):
    """DGQ's activation quantizers select their parameters by the current timestep, wired only into ComfyUI so
    far: load_unet says so instead of running the weights alone."""
    from helpers.fixtures import tiny_unet_inputs
    from lowbit.diffusers_glue.unet import load_unet
    from lowbit.quant_core.calib.record import CalibrationRecord
    calls = [dict(tiny_unet_inputs(batch=2, hw=16, seed=i), timesteps=torch.full((2,), float(t)))
             for i, t in enumerate((900.0, 100.0))]
    path = _file(tmp_path, config_from("dgq", weight_bits=8, act_bits=8), "dgq", CalibrationRecord(calls))
    with pytest.raises(LowBitError, match="quantizes activations per timestep"):
        load_unet(path)
