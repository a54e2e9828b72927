"""The SDXL-architecture variants and prediction types (issue 19), in process.

Full-size UNets of every variant are built on the meta device with ComfyUI's own UNetModel (shapes only, no
memory): LowBit's detection names the variant ComfyUI's detection builds, and other families are rejected by name.
The sampling settings a LowBit header records rebuild exactly the model_sampling (prediction class, schedule,
sigmas) and latent format that ComfyUI builds for a checkpoint with the corresponding marker keys."""

import pytest
import torch

from lowbit.quant_core.arch import VARIANTS, detect_unet_config
from lowbit.quant_core.errors import UnsupportedModelError
from lowbit.quant_core.sampling_settings import EPS, checked, from_markers, to_markers
from lowbit.quant_core.unet_file import layer_modules

pytestmark = pytest.mark.usefixtures("comfy_env_module")  # ComfyUI imported in CPU mode

SAMPLINGS = {
    "eps": dict(EPS),
    "v_prediction": {**EPS, "prediction": "v_prediction"},
    "v_prediction_ztsnr": {**EPS, "prediction": "v_prediction", "zsnr": True},
    "edm_playground": {**EPS, "prediction": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                       "latent_format": "SDXL_Playground_2_5"},
    "v_prediction_edm": {**EPS, "prediction": "v_prediction_edm", "sigma_min": 0.03125, "sigma_max": 1000.0,
                         "sigma_data": 1.0},
}


def meta_state_dict(variant: str) -> dict:
    from lowbit.bench.sdxl_random import variant_unet_config
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**variant_unet_config(variant), device="meta", operations=comfy.ops.disable_weight_init)
    return unet.state_dict()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_detected_as_comfyui_detects_it(variant):
    import comfy.model_detection
    sd = meta_state_dict(variant)
    config = detect_unet_config(sd)
    assert config["variant"] == variant
    assert config["arch"] == ("sdxl-refiner" if variant == "refiner" else "sdxl")
    comfy_config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(comfy_config).__name__ == VARIANTS[variant][2]
    # quantized like the base: every Linear/Conv2d in the blocks, each readable as a layer of the file
    layers = layer_modules({k: v for k, v in sd.items()})
    in_blocks = {k.rsplit(".", 1)[0] for k, v in sd.items() if k.endswith(".weight") and v.dim() in (2, 4)
                 and k.startswith(("input_blocks.", "middle_block.", "output_blocks."))
                 and not k.startswith("input_blocks.0.") and ".emb_layers." not in k}
    assert set(layers) == in_blocks and len(layers) > 100


def test_other_families_are_rejected_by_name():
    sd = meta_state_dict("base")
    unclip = {**sd, "label_emb.0.0.weight": torch.empty(1280, 1536, device="meta")}
    unclip = {k: (torch.empty(v.shape[0], 1024, device="meta") if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
                  else v) for k, v in unclip.items()}
    with pytest.raises(UnsupportedModelError, match="SD2.x unCLIP"):
        detect_unet_config(unclip)
    video = {**sd, "input_blocks.1.0.time_stack.in_layers.2.weight": torch.empty(320, 320, 3, 1, 1)}
    with pytest.raises(UnsupportedModelError, match="Stable Video Diffusion"):
        detect_unet_config(video)
    odd = {k: v for k, v in sd.items() if ".transformer_blocks.9." not in k}  # SDXL widths, an unknown depth
    with pytest.raises(UnsupportedModelError, match="matches no SDXL variant"):
        detect_unet_config(odd)


@pytest.mark.parametrize("name", list(SAMPLINGS))
@pytest.mark.parametrize("variant", ["base", "vega", "instruct-pix2pix"])
def test_recorded_sampling_rebuilds_what_comfyui_builds_for_the_checkpoint(variant, name):
    """ComfyUI's model for a checkpoint holding the marker keys of `name`, against the model built without them
    and given the recorded settings (lowbit.nodes.comfy_model.set_sampling): same model type, same model_sampling
    classes and sigmas, same latent format; the settings read back from the markers are the recorded ones; and
    what sampling_of reads from that MODEL is the record again."""
    import comfy.model_detection
    import comfy.model_patcher
    from lowbit.nodes.comfy_model import sampling_of, set_sampling
    sampling = SAMPLINGS[name]
    sd = meta_state_dict(variant)
    markers = {k: torch.tensor(v) for k, v in to_markers(sampling).items()}
    assert from_markers(markers, variant) == sampling
    reference = comfy.model_detection.model_config_from_unet(sd, "").get_model({**sd, **markers}, "", device="meta")
    model = comfy.model_detection.model_config_from_unet(sd, "").get_model(sd, "", device="meta")
    set_sampling(model, checked(sampling))
    assert model.model_type == reference.model_type
    assert type(model.model_sampling).__bases__ == type(reference.model_sampling).__bases__
    for attr in ("sigmas", "log_sigmas"):
        assert torch.equal(getattr(model.model_sampling, attr), getattr(reference.model_sampling, attr))
    assert model.model_sampling.sigma_data == reference.model_sampling.sigma_data
    assert type(model.latent_format) is type(reference.latent_format)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")
    assert sampling_of(patcher) == checked(sampling)


def test_upstream_model_sampling_patches_are_recorded_or_refused():
    """A MODEL whose model_sampling was replaced upstream by an object patch (as ComfyUI's ModelSamplingDiscrete
    node does; here v-prediction + zsnr on an eps checkpoint, built by ComfyUI's own model_sampling()) is recorded
    as such; one LowBit cannot rebuild (x0 prediction) is refused with the reason. (The node itself imports
    ComfyUI's top-level `nodes`, which this repository's package shadows in process.)"""
    import copy
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.model_sampling
    from lowbit.nodes.comfy_model import sampling_of
    from lowbit.quant_core.errors import LowBitError
    sd = meta_state_dict("vega")
    model = comfy.model_detection.model_config_from_unet(sd, "").get_model(sd, "", device="meta")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")
    assert sampling_of(patcher) == checked(SAMPLINGS["eps"])
    config = copy.copy(model.model_config)
    config.sampling_settings = {**config.sampling_settings, "zsnr": True}
    patched = patcher.clone()
    patched.add_object_patch("model_sampling",
                             comfy.model_base.model_sampling(config, comfy.model_base.ModelType.V_PREDICTION))
    assert sampling_of(patched) == checked(SAMPLINGS["v_prediction_ztsnr"])

    class X0Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0):
        pass
    refused = patcher.clone()
    refused.add_object_patch("model_sampling", X0Sampling(model.model_config))
    with pytest.raises(LowBitError, match="cannot record"):
        sampling_of(refused)


@pytest.fixture(scope="module")
def vpred_vega():
    """A random full-size Segmind Vega UNet file marked v-prediction + zero terminal SNR (cached)."""
    from lowbit.bench.sdxl_random import sdxl_variant_unet
    return sdxl_variant_unet("vega", {"v_pred": 0.0, "ztsnr": 0.0})


def test_a_vpred_ztsnr_model_quantized_in_comfyui_and_from_the_file_loads_as_comfyui_builds_it(vpred_vega, tmp_path):
    """Quantized RTN W4 by LowBitQuantizeUNet from the MODEL ComfyUI's UNet loader builds, and by the CLI's path from
    the file: both saved and loaded by LowBitLoadQuantizedUNet are the class, model type, model_sampling (classes,
    sigmas) and latent format ComfyUI builds for the fp file, and compute bit-identically to the in-memory
    quantized model (and to each other: the same codes from the same fp16 weights)."""
    import comfy.sd
    import folder_paths
    from lowbit.nodes.load import LowBitLoadQuantizedUNet
    from lowbit.nodes.quantize import LowBitQuantizeUNet
    from lowbit.nodes.save import LowBitSaveQuantizedUNet
    from lowbit.quant_core.fileformat import read_header, save
    from lowbit.quant_core.methods import config_from
    from lowbit.quant_core.unet_file import quantize_checkpoint
    folder_paths.set_output_directory(str(tmp_path))
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path / "diffusion_models"))
    fp = comfy.sd.load_diffusion_model(str(vpred_vega))
    assert type(fp.model.model_sampling).__bases__[1].__name__ == "V_PREDICTION" and fp.model.model_sampling.zsnr
    quantized = LowBitQuantizeUNet.execute(fp, "rtn", 4, 128).result[0]
    LowBitSaveQuantizedUNet.execute(quantized, "lowbit/vega")
    tensors, header = quantize_checkpoint(vpred_vega, config_from("rtn", bits=4, group_size=128))
    save(tmp_path / "diffusion_models" / "lowbit" / "vega_cli.safetensors", tensors, header)
    del tensors
    recorded = read_header(tmp_path / "diffusion_models" / "lowbit" / "vega_cli.safetensors")
    assert recorded["sampling"] == SAMPLINGS["v_prediction_ztsnr"] and recorded["unet_config"]["variant"] == "vega"
    loaded = LowBitLoadQuantizedUNet.execute("lowbit/vega_00001_.safetensors").result[0]
    from_cli = LowBitLoadQuantizedUNet.execute("lowbit/vega_cli.safetensors").result[0]
    for model in (quantized, loaded, from_cli):
        assert type(model.model) is type(fp.model) and model.model.model_type == fp.model.model_type
        assert type(model.model.model_sampling).__bases__ == type(fp.model.model_sampling).__bases__
        assert torch.equal(model.model.model_sampling.sigmas, fp.model.model_sampling.sigmas)
        assert type(model.model.latent_format) is type(fp.model.latent_format)
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(1, 4, 8, 8, generator=g), "timesteps": torch.tensor([500.0]),
              "context": torch.randn(1, 8, 2048, generator=g), "y": torch.randn(1, 2816, generator=g)}
    with torch.no_grad():
        out = quantized.model.diffusion_model(**inputs)
        assert torch.equal(loaded.model.diffusion_model(**inputs), out)
        assert torch.equal(from_cli.model.diffusion_model(**inputs), out)
        reference = fp.model.diffusion_model(**{k: v.to(fp.model.get_dtype()) for k, v in inputs.items()}).float()
    assert torch.isfinite(out).all() and (out.float() - reference).norm() / reference.norm() < 0.5
