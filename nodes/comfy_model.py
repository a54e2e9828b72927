"""Glue between LowBit's quantized layers and ComfyUI's model objects (no quantization math here).

A LowBit MODEL is a stock ComfyUI BaseModel/ModelPatcher whose selected Linear/Conv2d modules are
LowBit layers. The model is built with ComfyUI's own config detection, run on the layers' *logical* shapes,
so it is exactly the model ComfyUI would build for the fp16 UNet; the Linear/Conv2d weights are created
on the meta device and never allocated in full precision.
"""
import copy
import math
from dataclasses import dataclass

import torch

import comfy.latent_formats
import comfy.lora
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
from comfy.model_patcher import LowVramPatch
from comfy.patcher_extension import CallbacksMP

from ..quant_core.actquant import prepare_unet
from ..quant_core.arch import VARIANTS, detect_unet_config
from ..quant_core.errors import LowBitError, UnsupportedModelError
from ..quant_core.fileformat import DENSE_DTYPE, Header
from ..quant_core.qlayers import QuantizedLayer, set_submodule
from ..quant_core.sampling_settings import checked
from ..quant_core.selection import select_layers
from ..testbed.model import TESTBED_MODEL_CLASS, testbed_model_config

LOWBIT_ATTR = "lowbit_info"  # set on the BaseModel: its fileformat.Header


def _meta_weight_ops(base):
    """An operations class like `base` whose Linear/Conv2d start on the meta device (filled in later)."""
    class MetaWeightOps(base):
        class Linear(base.Linear):
            def __init__(self, *args, device=None, **kwargs):
                super().__init__(*args, device="meta", **kwargs)

        class Conv2d(base.Conv2d):
            def __init__(self, *args, device=None, **kwargs):
                super().__init__(*args, device="meta", **kwargs)
    return MetaWeightOps


def logical_state_dict(layers: dict, dense: dict) -> dict:
    """Meta tensors with the shapes the fp16 UNet would have (what ComfyUI's detection reads)."""
    sd = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in dense.items()}
    for name, layer in layers.items():
        sd[f"{name}.weight"] = torch.empty(layer.weight_shape, dtype=layer.weight_dtype, device="meta")
        if layer.bias is not None:
            sd[f"{name}.bias"] = torch.empty(layer.bias.shape, dtype=layer.bias.dtype, device="meta")
    return sd


def build_model(layers: dict, dense: dict, lowbit_info: Header, model_config=None):
    """ModelPatcher of an SDXL-family model made of LowBit `layers` and `dense` tensors."""
    logical = logical_state_dict(layers, dense)
    if model_config is None and lowbit_info.model_class == TESTBED_MODEL_CLASS:
        model_config = testbed_model_config()  # its own conditioning (pooled text + size vector), latents, schedule
    if model_config is None:
        # SDXL-architecture UNets of other widths (tests) get ComfyUI's generic config
        model_config = comfy.model_detection.model_config_from_unet(logical, "", use_base_if_no_match=True)
        variant = lowbit_info.unet_config.get("variant")
        if variant in VARIANTS:
            allowed = {VARIANTS[variant][2]}
        elif lowbit_info.arch == "sdxl":  # files written before the variant was recorded
            allowed = {"SDXL", "SSD1B", "Segmind_Vega"}
        else:
            allowed = None
        if model_config is None or (allowed and type(model_config).__name__ not in allowed):
            raise UnsupportedModelError(
                f"ComfyUI does not recognise this UNet as the SDXL {variant or lowbit_info.arch} it was quantized "
                f"from (it detects {type(model_config).__name__ if model_config else 'nothing'}); the file does not "
                "hold a supported SDXL model: re-create it from the original checkpoint")
    model_config = copy.deepcopy(model_config)  # never touch the config of another MODEL
    sampling = None if lowbit_info.sampling is None else checked(lowbit_info.sampling)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    unet_dtype = comfy.model_management.unet_dtype(model_params=sum(t.numel() for t in logical.values()),
                                                   supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device,
                                                          model_config.supported_inference_dtypes)
    if unet_dtype == torch.float32 and manual_cast is None and DENSE_DTYPE in model_config.supported_inference_dtypes:
        # (CPU) the dense tensors are 16-bit in the file: keep them so, half the memory, and compute in fp32
        unet_dtype, manual_cast = DENSE_DTYPE, torch.float32
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model_config.custom_operations = _meta_weight_ops(
        comfy.ops.pick_operations(unet_dtype, manual_cast, load_device=load_device))
    model = model_config.get_model(logical, "")
    if sampling is not None:
        set_sampling(model, sampling)
    unet = model.diffusion_model
    for name, layer in layers.items():
        set_submodule(unet, name, layer)
    # rounded to the file's 16-bit storage first, so a freshly quantized MODEL computes exactly what its
    # saved and reloaded file computes
    # (a copy: never share storage with the source MODEL, whose weights ComfyUI patches in place)
    fp = {k: (v.to(DENSE_DTYPE, copy=True).to(unet_dtype) if v.is_floating_point() else v)
          for k, v in dense.items()}
    unet.load_state_dict(fp, strict=False, assign=True)
    missing = [k for k, v in list(unet.named_parameters()) + list(unet.named_buffers()) if v.is_meta]
    if missing:
        raise LowBitError(f"the quantized UNet lacks {len(missing)} tensors (e.g. {missing[:3]}); the file is "
                          "incomplete: re-create it")
    prepare_unet(unet)  # activation-quantized layers (dgq, pcr) select their parameters by timestep
    setattr(model, LOWBIT_ATTR, lowbit_info)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(CallbacksMP.ON_LOAD, attach_weight_patches)  # clones (e.g. LoraLoader's) keep it
    return patcher


_PREDICTION_TYPES = {"eps": "EPS", "v_prediction": "V_PREDICTION", "edm": "EDM",
                     "v_prediction_edm": "V_PREDICTION_EDM"}


def sampling_of(model_patcher) -> dict:
    """The prediction type and schedule a MODEL samples with (lowbit.quant_core.sampling_settings), including a
    model_sampling / latent_format patch applied upstream (ModelSamplingDiscrete, ModelSamplingContinuousEDM).
    What LowBit cannot record (flow shift, LCM, x0 and other schedules) is an error naming it."""
    ms = model_patcher.get_model_object("model_sampling")
    latent = type(model_patcher.get_model_object("latent_format")).__name__
    ims = comfy.model_sampling
    # ComfyUI makes every model_sampling as class ModelSampling(schedule, prediction) (model_base, the
    # ModelSampling* nodes): the two bases say exactly what it does
    bases = type(ms).__bases__
    schedule, prediction = bases if len(bases) == 2 else (None, None)
    if schedule is ims.ModelSamplingContinuousEDM and prediction in (ims.EDM, ims.V_PREDICTION):
        low, high = _edm_range(ms)
        return {"prediction": "edm" if prediction is ims.EDM else "v_prediction_edm", "zsnr": False,
                "sigma_min": low, "sigma_max": high, "sigma_data": float(ms.sigma_data), "latent_format": latent}
    if schedule is ims.ModelSamplingDiscrete and prediction in (ims.EPS, ims.V_PREDICTION):
        # only the model's own beta schedule (with or without zero terminal SNR) can be rebuilt from the header
        standard = ims.ModelSamplingDiscrete(model_patcher.model.model_config, zsnr=bool(ms.zsnr))
        if standard.sigmas.shape == ms.sigmas.shape and torch.equal(standard.sigmas, ms.sigmas.cpu()):
            return {"prediction": "eps" if prediction is ims.EPS else "v_prediction", "zsnr": bool(ms.zsnr),
                    "sigma_min": None, "sigma_max": None, "sigma_data": None, "latent_format": latent}
    raise LowBitError(f"this MODEL samples with {' + '.join(c.__name__ for c in bases)} "
                      "that a LowBit file cannot record (it records eps / v-prediction on the model's discrete "
                      "schedule, with or without zero terminal SNR, and EDM / v-EDM continuous schedules); quantize "
                      "the MODEL before that patch and apply it again after loading the LowBit model")


def _edm_range(ms) -> tuple:
    """(sigma_min, sigma_max) a continuous EDM schedule was made with: its sigmas are exp(linspace(log min,
    log max)) in float32, so the ends it stores are not the parameters; the shortest decimals that rebuild
    exactly these sigmas are (0.002 and 80 for Playground, not 0.0019999999)."""
    sigmas = ms.sigmas.cpu()
    for digits in range(1, 18):
        low, high = (float(f"{float(v):.{digits}g}") for v in (sigmas[0], sigmas[-1]))
        if torch.equal(torch.linspace(math.log(low), math.log(high), len(sigmas)).exp(), sigmas):
            return low, high
    raise LowBitError("this MODEL's continuous EDM schedule is not a log-linear one LowBit can record; quantize "
                      "the MODEL before the patch that made it and apply the patch again after loading")


def set_sampling(model, sampling: dict) -> None:
    """Give a freshly built BaseModel the recorded prediction type, schedule and latent format (what ComfyUI
    builds for the original checkpoint; also what a MODEL's upstream model_sampling patch made it)."""
    model_type = comfy.model_base.ModelType[_PREDICTION_TYPES[sampling["prediction"]]]
    config = copy.copy(model.model_config)
    config.sampling_settings = dict(config.sampling_settings)
    if sampling["zsnr"]:
        config.sampling_settings["zsnr"] = True
    for key in ("sigma_min", "sigma_max", "sigma_data"):
        if sampling[key] is not None:
            config.sampling_settings[key] = sampling[key]
    model.model_type = model_type
    model.model_sampling = comfy.model_base.model_sampling(config, model_type)
    latent = getattr(comfy.latent_formats, sampling["latent_format"], None)
    if latent is None:
        raise LowBitError(f"the file's latent format {sampling['latent_format']!r} is unknown to this ComfyUI; "
                          "update ComfyUI")
    model.latent_format = latent()
    model.model_config.latent_format = model.latent_format


def checkpoint_parts(model_patcher, clip, vae) -> dict:
    """{"clip": ..., "vae": ...} state dicts under the keys a checkpoint of this model stores them, made by
    ComfyUI's own saving path (as its CheckpointSave: CLIP weight patches such as a LoRA baked in)."""
    config = model_patcher.model.model_config
    parts = {}
    if clip is not None:
        comfy.model_management.load_models_gpu([clip.load_model()], force_patch_weights=True)
        parts["clip"] = config.process_clip_state_dict_for_saving(clip.get_sd())
    if vae is not None:
        parts["vae"] = config.process_vae_state_dict_for_saving(vae.get_sd())
    return parts


def clip_and_vae(lowbit_file) -> tuple:
    """(CLIP, VAE) of a one-file LowBit checkpoint, built by ComfyUI's checkpoint loader from the bundled tensors
    (the UNet's logical shapes, on the meta device, let it detect the model family and its text encoders)."""
    import folder_paths
    import comfy.sd
    logical = logical_state_dict(lowbit_file.layers, lowbit_file.dense)
    sd = {**lowbit_file.bundled, **{f"model.diffusion_model.{k}": v for k, v in logical.items()}}
    _, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=True, output_clip=True, output_model=False,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if clip is None:
        raise LowBitError("ComfyUI found no text encoder in this LowBit checkpoint's bundled tensors; the file is "
                          "damaged: save it again with Save LowBit Checkpoint")
    return clip, vae


def attach_weight_patches(patcher, *load_args):
    """After ComfyUI loads a LowBit MODEL: hand each quantized layer the weight patches (LoRA, ...) of the
    MODEL being loaded, applied to its dequantized weight at every forward (ComfyUI's own LowVramPatch does
    the arithmetic). Quantized weights are never patched in place or requantized; layers of a clone without
    patches get none, so unloading a LoRA is loading the MODEL without it."""
    for name, module in patcher.model.diffusion_model.named_modules():
        if isinstance(module, QuantizedLayer):
            key = f"diffusion_model.{name}.weight"
            module.weight_function = [LowVramPatch(key, patcher.patches)] if key in patcher.patches else []


@dataclass
class UNetSource:
    """What quantizing reads from an SDXL MODEL, read once: its architecture facts, the layers that may be
    quantized and every UNet tensor as the MODEL computes with it (weight patches such as LoRA applied to
    copies, so the quantized model matches what the MODEL computed)."""
    unet_config: dict
    layers: dict    # name -> Linear/Conv2d holding the (patched) weight to quantize
    tensors: dict   # every UNet tensor, patched

    @classmethod
    def read(cls, model_patcher) -> "UNetSource":
        """Rejects other families and already-quantized MODELs."""
        unet = model_patcher.model.diffusion_model
        if any(isinstance(m, QuantizedLayer) for m in unet.modules()):
            raise LowBitError("this MODEL is already LowBit-quantized; connect the original (fp16) MODEL instead")
        state = unet.state_dict()
        unet_config = detect_unet_config(state)
        tensors = {k: unet_tensor(model_patcher, k, v, with_patches=True) for k, v in state.items()}
        layers = {}
        for name, module in select_layers(unet).items():
            weight = tensors[f"{name}.weight"]
            if weight is not state[f"{name}.weight"]:
                module = copy.deepcopy(module)
                module.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
            layers[name] = module
        return cls(unet_config, layers, tensors)

    def dense(self, quantized: dict) -> dict:
        """The tensors outside the `quantized` layers (those stay 16-bit in the LowBit MODEL)."""
        return {k: v for k, v in self.tensors.items() if k.rsplit(".", 1)[0] not in quantized}


def unet_tensor(model_patcher, key: str, tensor: torch.Tensor, with_patches: bool) -> torch.Tensor:
    """A UNet tensor as stored (never a weight patched in place by a loaded MODEL), optionally with the
    MODEL's weight patches (e.g. LoRA) applied to a copy."""
    full = f"diffusion_model.{key}"
    if full in model_patcher.backup:
        tensor = model_patcher.backup[full].weight
    if with_patches and full in model_patcher.patches:
        patched = comfy.lora.calculate_weight(model_patcher.patches[full], tensor.detach().float().clone(), full)
        tensor = patched.to(tensor.dtype)
    return tensor


def stored_state(model_patcher, skip: dict) -> dict:
    """A LowBit MODEL's UNet tensors outside the layers in `skip`, as stored (no weight patches): what its
    file holds besides the quantized layers."""
    unet = model_patcher.model.diffusion_model
    return {k: unet_tensor(model_patcher, k, v, with_patches=False) for k, v in unet.state_dict().items()
            if k.rsplit(".", 1)[0] not in skip}
