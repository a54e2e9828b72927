"""Layer selection on the full-size SDXL architecture (built on the meta device: no weights allocated)."""
import pytest
import torch

from lowbit.quant_core.arch import detect_unet_config
from lowbit.quant_core.selection import select_layers

SDXL_QUANTIZED_LAYERS = 771  # the count the RTN end-to-end test (test_rtn_e2e.py) expects in its saved file


@pytest.fixture(scope="module")
def sdxl_meta_unet():
    from helpers.comfy_env import import_comfy
    from helpers.fixtures import SDXL_UNET_CONFIG
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**SDXL_UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)


def test_sdxl_selection_counts(sdxl_meta_unet):
    unet = sdxl_meta_unet
    total = sum(p.numel() for p in unet.parameters())
    layers = select_layers(unet)
    selected = sum(m.weight.numel() for m in layers.values())
    linear = [m for m in layers.values() if isinstance(m, torch.nn.Linear)]
    conv = [m for m in layers.values() if isinstance(m, torch.nn.Conv2d)]
    # exact: the architecture is fixed (SDXL_UNET_CONFIG), so any change of the selection rule shows up here
    assert total == 2_567_463_684
    assert selected == 2_540_953_600  # 99.0% of the UNet
    assert len(layers) == len(linear) + len(conv)
    assert (len(layers), len(linear), len(conv)) == (SDXL_QUANTIZED_LAYERS, 722, 49)
    names = set(layers)
    assert "input_blocks.0.0" not in names and not any(n.startswith(("out.", "time_embed", "label_emb"))
                                                       for n in names)
    assert not any("emb_layers" in n for n in names)
    for kept in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.proj_in",
                 "middle_block.1.transformer_blocks.9.ff.net.0.proj", "output_blocks.2.2.conv",
                 "input_blocks.3.0.op", "input_blocks.4.0.skip_connection", "output_blocks.8.0.out_layers.3"):
        assert kept in names, kept
    assert all(m.weight.shape[1] % 8 == 0 for m in linear)


def test_detect_unet_config_on_sdxl_shapes(sdxl_meta_unet):
    config = detect_unet_config(sdxl_meta_unet.state_dict())
    assert config["arch"] == "sdxl"
    assert config["transformer_depth"] == [0, 0, 2, 2, 10, 10]
    assert config["transformer_depth_middle"] == 10
    assert config["transformer_depth_output"] == [0, 0, 0, 2, 2, 2, 10, 10, 10]
