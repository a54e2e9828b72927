"""Quantized Linear / Conv2d modules.

They hold the packed tensors of one layout as frozen parameters (so `state_dict()`, memory accounting and
partial (lowvram) loading see and move the true, small tensors) and report the logical weight shape and dtype
of the layer they replace. The forward goes through lowbit.quant_core.ops, the one place that picks a fast
kernel or the torch reference.

Two hooks let a host framework patch weights without requantizing them (ComfyUI's weight-patch protocol):
- `weight_function` / `bias_function`: callables applied to the dequantized weight / bias at every forward
  (e.g. a LoRA delta); with any set, the layer dequantizes and runs the dense op.
- `comfy_cast_weights`: when the host leaves the layer in CPU memory and sets this, each forward moves the
  packed tensors (not a dense weight) to the input's device first.
A zero-element `weight` buffer makes `<layer>.weight` appear in `state_dict()`, so tools that find layers by
their weight keys (LoRA key maps) see quantized layers, while memory accounting stays true.
"""
import math
from contextlib import contextmanager
from typing import Mapping, Optional

import torch
from torch import nn

from . import ops
from .layouts import get_layout, matrix_view, validate_tensors, weight_from_matrix  # noqa: F401 (matrix_view: re-exported)


class QuantizedLayer(nn.Module):
    """Common part of LowBitLinear / LowBitConv2d."""

    kind: str

    def __init__(self, layout: str, params: Mapping, weight_shape, weight_dtype: torch.dtype,
                 tensors: Mapping[str, torch.Tensor], bias: Optional[torch.Tensor]):
        super().__init__()
        self.layout = get_layout(layout)
        self.params = dict(params)
        self.weight_shape = torch.Size(weight_shape)
        self.weight_dtype = weight_dtype
        self.out_features = self.weight_shape[0]
        self.in_features = math.prod(self.weight_shape[1:])  # K of the matrix view
        validate_tensors(self.layout, self.params, self.out_features, self.in_features, tensors,
                         where=type(self).__name__)
        self.tensor_names = tuple(self.layout.tensor_specs(self.params, self.out_features, self.in_features))
        for name in self.tensor_names:
            self.register_parameter(name, nn.Parameter(tensors[name], requires_grad=False))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.register_buffer("weight", torch.empty(0, dtype=weight_dtype))
        self.weight_function, self.bias_function = [], []
        self.comfy_cast_weights = False
        self.allocation = None  # method auto: {"format", "stored_bits", "sensitivity"}, kept in the header

    def packed_tensors(self) -> dict:
        return {name: getattr(self, name) for name in self.tensor_names}

    def dequantize_matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """Dense [out, K] matrix view (reference path), computed on `device` (default: where the tensors are)."""
        tensors = {k: v.to(device, non_blocking=True) for k, v in self.packed_tensors().items()} \
            if device is not None else self.packed_tensors()
        w = self.layout.dequantize(tensors, self.params, self.out_features, self.in_features)
        return w.to(dtype)

    def dequantize_weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """Dense weight in the logical shape of the original layer."""
        raise NotImplementedError

    def dense_op(self, x, weight, bias):
        raise NotImplementedError

    def forward(self, x):
        if not (self.weight_function or self.bias_function or self.comfy_cast_weights):
            return self.fast_forward(x)
        weight = ops.decode(self, x)
        for f in self.weight_function:
            weight = f(weight)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype, non_blocking=True)
        for f in self.bias_function:
            bias = f(bias)
        return self.dense_op(x, weight, bias)

    def fast_forward(self, x):
        raise NotImplementedError

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    @classmethod
    def from_header(cls, entry: Mapping, tensors: Mapping, dtype: torch.dtype, bias, where: str, **extra):
        """The layer a header entry describes (`extra`: constructor arguments subclasses add)."""
        return cls(entry["layout"], entry["params"], entry["weight_shape"], dtype, tensors, bias, **extra)

    def header_entry(self) -> dict:
        """What the file header records for this layer (everything but the tensors)."""
        return {"kind": self.kind, "layout": self.layout.name, "params": self.params,
                "weight_shape": list(self.weight_shape), "weight_dtype": str(self.weight_dtype).split(".")[-1],
                "bias": self.bias is not None, **({"allocation": self.allocation} if self.allocation else {})}

    def extra_repr(self) -> str:
        return f"{self.layout.name} {self.params} weight_shape={tuple(self.weight_shape)}"


class LowBitLinear(QuantizedLayer):
    kind = "linear"

    def dequantize_weight(self, dtype=torch.float32, device=None):
        return self.dequantize_matrix(dtype, device)

    def dense_op(self, x, weight, bias):
        return nn.functional.linear(x, weight, bias)

    def fast_forward(self, x):
        return ops.linear(x, self)


class LowBitConv2d(QuantizedLayer):
    kind = "conv2d"

    def __init__(self, layout, params, weight_shape, weight_dtype, tensors, bias, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1)):
        super().__init__(layout, params, weight_shape, weight_dtype, tensors, bias)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    def dequantize_weight(self, dtype=torch.float32, device=None):
        return weight_from_matrix(self.dequantize_matrix(dtype, device), self.weight_shape)

    def dense_op(self, x, weight, bias):
        return nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    @classmethod
    def from_header(cls, entry, tensors, dtype, bias, where, **extra):
        conv = entry["conv"]
        return super().from_header(entry, tensors, dtype, bias, where, stride=conv["stride"],
                                   padding=conv["padding"], dilation=conv["dilation"], **extra)

    def header_entry(self):
        entry = super().header_entry()
        entry["conv"] = {"stride": list(self.stride), "padding": list(self.padding),
                         "dilation": list(self.dilation)}
        return entry

    def fast_forward(self, x):
        return ops.conv2d(x, self)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_modules(root: nn.Module, modules: dict) -> dict:
    """Put `modules` (name -> module) into `root`; returns the modules they replaced (swap those back to undo)."""
    replaced = {}
    for name, module in modules.items():
        replaced[name] = root.get_submodule(name)
        set_submodule(root, name, module)
    return replaced


@contextmanager
def swapped(root: nn.Module, modules: dict):
    """`root` with `modules` (name -> module) in place, restored afterwards."""
    replaced = swap_modules(root, modules)
    try:
        yield
    finally:
        swap_modules(root, replaced)


def split_result(result: dict) -> tuple[dict, dict]:
    """A method's result (name -> replacement module) as (name -> QuantizedLayer, '<module>.<tensor>' -> tensor
    of the 16-bit modules it retrained, e.g. norms after VQ's distillation): what a file holds in place of the
    source's tensors."""
    layers = {name: m for name, m in result.items() if isinstance(m, QuantizedLayer)}
    dense = {f"{name}.{key}": t.detach() for name, m in result.items() if name not in layers
             for key, t in m.state_dict().items()}
    return layers, dense


def quantized_layers(model: nn.Module) -> dict:
    """name -> QuantizedLayer of every quantized layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def make_quantized_layer(module: nn.Module, layout: str, params: Mapping, tensors: Mapping) -> QuantizedLayer:
    """Build the quantized replacement of an nn.Linear / nn.Conv2d from its packed tensors."""
    # bias kept in 16-bit, as saved, so an in-memory model and its reloaded file compute the same
    bias = None if module.bias is None else module.bias.detach().to(torch.float16)
    if isinstance(module, nn.Conv2d):
        return LowBitConv2d(layout, params, module.weight.shape, module.weight.dtype, tensors, bias,
                            module.stride, module.padding, module.dilation)
    return LowBitLinear(layout, params, module.weight.shape, module.weight.dtype, tensors, bias)


# header "kind" -> layer class; classes defined elsewhere (e.g. lowbit.quant_core.actquant) add themselves
# with @register_layer_class
LAYER_CLASSES: dict[str, type] = {"linear": LowBitLinear, "conv2d": LowBitConv2d}


def register_layer_class(cls: type) -> type:
    LAYER_CLASSES[cls.kind] = cls
    return cls


def layer_from_header(entry: Mapping, tensors: Mapping[str, torch.Tensor], where: str) -> QuantizedLayer:
    """Rebuild a quantized layer from its header entry and stored tensors (validated)."""
    from .errors import FileFormatError
    dtype = getattr(torch, str(entry.get("weight_dtype")), None)
    kind = entry.get("kind")
    if not isinstance(dtype, torch.dtype) or kind not in LAYER_CLASSES:
        raise FileFormatError(f"{where}: bad layer entry {dict(entry)}; the file is corrupt: re-create it")
    bias = tensors.get("bias") if entry.get("bias") else None
    if entry.get("bias") and bias is None:
        raise FileFormatError(f"{where}: bias missing; the file is incomplete: re-create it")
    try:
        layer = LAYER_CLASSES[kind].from_header(entry, tensors, dtype, bias, where)
        layer.allocation = entry.get("allocation")
        return layer
    except FileFormatError as e:
        raise FileFormatError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{where}: bad layer entry ({e}); the file is corrupt: re-create it") from None
