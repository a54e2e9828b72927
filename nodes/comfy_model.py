"""Glue between LowBit's quantized layers and ComfyUI's model objects (no quantization math here).

A LowBit MODEL is a stock ComfyUI BaseModel/ModelPatcher whose selected Linear/Conv2d modules are
LowBit layers. The model is built with ComfyUI's own config detection, run on the layers' *logical* shapes,
so it is exactly the model ComfyUI would build for the fp16 UNet; the Linear/Conv2d weights are created
on the meta device and never allocated in full precision.
"""
import copy
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
from comfy.model_patcher import LowVramPatch
from comfy.patcher_extension import CallbacksMP

from ..quant_core.actquant import prepare_unet
from ..quant_core.arch import detect_unet_config
from ..quant_core.errors import LowBitError, UnsupportedModelError
from ..quant_core.fileformat import DENSE_DTYPE, Header
from ..quant_core.qlayers import QuantizedLayer, set_submodule
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
        if model_config is None or (lowbit_info.arch == "sdxl"
                                    and type(model_config).__name__ not in ("SDXL", "SSD1B", "Segmind_Vega")):
            raise UnsupportedModelError("ComfyUI does not recognise this UNet as SDXL; the file does not hold a "
                                        "supported SDXL model: re-create it from an SDXL checkpoint")
    model_config = copy.deepcopy(model_config)  # never touch the config of another MODEL
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
