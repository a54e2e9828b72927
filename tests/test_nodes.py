"""The nodes in-process (real ComfyUI classes, no server): schemas, and quantize -> save -> load on a tiny
SDXL-structure MODEL."""
import asyncio

import pytest
import torch

from helpers.comfy_env import import_comfy


@pytest.fixture(scope="module")
def comfy():
    return import_comfy()


@pytest.fixture(scope="module")
def node_list(comfy):
    from lowbit import comfy_entrypoint
    ext = asyncio.run(comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def test_every_node_is_lowbit_v3_with_tooltips(node_list):
    ids = {n.GET_SCHEMA().node_id for n in node_list}
    assert {"LowBitLoadQuantizedUNet", "LowBitQuantizeUNet", "LowBitSaveQuantizedUNet", "LowBitModelInfo",
            "LowBitCalibrate", "LowBitCompare"} <= ids
    for node in node_list:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("LowBit") and schema.category.startswith("LowBit/")
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{schema.node_id}: inputs without tooltip {missing}"


@pytest.fixture()
def tiny_model(comfy, tmp_path):
    import comfy.model_patcher
    import comfy.supported_models_base
    import folder_paths
    from helpers.fixtures import TINY_SDXL_UNET_CONFIG, tiny_sdxl_unet
    config = comfy.supported_models_base.BASE(dict(TINY_SDXL_UNET_CONFIG))
    config.unet_extra_config = {}  # keep the fixture's head size
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(tiny_sdxl_unet(0).state_dict())
    folder_paths.set_output_directory(str(tmp_path))
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path / "diffusion_models"))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def test_quantize_save_load_roundtrip(tiny_model):
    import json
    from helpers.fixtures import tiny_unet_inputs
    from lowbit.nodes.info import LowBitModelInfo
    from lowbit.nodes.load import LowBitLoadQuantizedUNet
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    from lowbit.nodes.save import LowBitSaveQuantizedUNet
    from lowbit.quant_core.qlayers import QuantizedLayer
    inputs = tiny_unet_inputs()
    with torch.no_grad():
        ref = tiny_model.model.diffusion_model(**inputs)
        quantized = LowBitQuantizeUNet.execute(tiny_model, "rtn", 8, 0).result[0]
        out = quantized.model.diffusion_model(**inputs)
    assert not any(isinstance(m, QuantizedLayer) for m in tiny_model.model.diffusion_model.modules())
    assert ((out - ref).norm() / ref.norm()) < 0.03
    path = LowBitSaveQuantizedUNet.execute(quantized, "lowbit/tiny").result[0]
    assert path.endswith("tiny_00001_.safetensors")
    path2 = LowBitSaveQuantizedUNet.execute(quantized, "lowbit/tiny").result[0]
    assert path2.endswith("tiny_00002_.safetensors")  # never overwrites
    loaded = LowBitLoadQuantizedUNet.execute("lowbit/tiny_00001_.safetensors").result[0]
    with torch.no_grad():
        assert torch.equal(loaded.model.diffusion_model(**inputs), out)
    report = json.loads(LowBitModelInfo.execute(loaded).result[0])
    assert report["method"] == "rtn" and report["quantized_layers"] == 181
    # per-channel 8 bit: 8 bits + (fp16 scale + uint8 zero) per row of K = 32..2880 entries
    assert 8.0 < report["bits_per_weight"] < 8.2
    assert report["total_bytes"] < 0.6 * report["fp16_bytes"]


def test_quantize_rejects_non_sdxl_and_double_quantization(tiny_model, comfy):
    import comfy.model_patcher
    import comfy.supported_models_base
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    from lowbit.quant_core import LowBitError, UnsupportedModelError
    from helpers.fixtures import SD15_UNET_CONFIG
    quantized = LowBitQuantizeUNet.execute(tiny_model, "rtn", 4, 0).result[0]
    with pytest.raises(LowBitError, match="already LowBit-quantized"):
        LowBitQuantizeUNet.execute(quantized, "rtn", 4, 0)
    config = dict(SD15_UNET_CONFIG, model_channels=32, context_dim=64, num_heads=2)
    sd15 = comfy.supported_models_base.BASE(config).get_model({}, device="meta")
    patcher = comfy.model_patcher.ModelPatcher(sd15, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="non-SDXL UNet.*label_emb"):
        LowBitQuantizeUNet.execute(patcher, "rtn", 4, 128)
