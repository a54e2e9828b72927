"""LowBit weights as comfy_kitchen `QuantizedTensor`s, the quantized-weight protocol of newer ComfyUI.

Newer ComfyUI keeps quantized weights as `comfy_kitchen.tensor.QuantizedTensor`: a tensor subclass that reports
the logical shape and dtype, moves/copies/pins its packed storage like any tensor, and routes ops to handlers
registered for its layout, dequantizing for any op without one. Importing this module (which needs
comfy_kitchen) registers one layout per LowBit layout:

- `LowBitIntAffineLayout`: qdata = `qweight` (bit-packed codes), params carry `scale`, `zero`, bits, group_size;
- `LowBitVQLayout`: qdata = `codes`, params carry `scale` (the per-row scales), `codebooks`, num_codebooks,
  group_size.

`dequantize` is the LowBit layout's torch reference; `linear` (as ComfyUI's ops reach it: `t` then `mm` /
`addmm`, or `aten.linear` directly) and `convolution` go through lowbit.quant_core.ops, i.e. the Triton
kernels on a CUDA GPU and the torch reference elsewhere. `QuantizedTensor.from_float(w, "LowBitIntAffineLayout",
bits=4, group_size=128)` quantizes round-to-nearest; `"LowBitVQLayout"` runs the data-free VQ fit
(lowbit.quant_core.vq_codec.fit_vq, H = I). `to_quantized_tensor(layer)` wraps a LowBit layer's packed tensors
without copying them; `from_quantized_tensor(qt)` gives the layer back.

ComfyUI 0.3.75, the version this pack is tested in, predates comfy_kitchen: there LowBit's own layer classes
(lowbit.quant_core.qlayers) are the path, and this module is only exercised at tensor level (tests/test_kitchen.py).
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from comfy_kitchen.tensor import (BaseLayoutParams, QuantizedLayout, QuantizedTensor, dequantize_args,
                                  register_layout_class, register_layout_op)

from ..quant_core.layouts.int_affine import quantize_int_affine
from ..quant_core.layouts.vq import CODEBOOK_BITS
from ..quant_core.qlayers import LowBitConv2d, LowBitLinear, QuantizedLayer, matrix_view
from ..quant_core.vq_codec import fit_vq
from ..quant_core import ops


class _LowBitLayout(QuantizedLayout):
    """Shared part: a LowBit layout's tensors split into qdata + params, and the layer they describe."""

    lowbit_layout: str          # name in lowbit.quant_core.layouts
    qdata_name: str             # which packed tensor is the QuantizedTensor's qdata
    scale_name: str             # which one is BaseLayoutParams.scale
    extra_name: str             # the third packed tensor, a Params field of the same name
    param_fields: tuple         # the LowBit layout params kept as Params fields
    fixed_params: dict = {}     # LowBit layout params that never vary

    @classmethod
    def extra_tensors(cls, params) -> dict:
        return {cls.extra_name: getattr(params, cls.extra_name)}

    @classmethod
    def lowbit_params(cls, params) -> dict:
        return {**{f: getattr(params, f) for f in cls.param_fields}, **cls.fixed_params}

    @classmethod
    def fields_of(cls, lowbit_params: dict) -> dict:
        """Params fields (besides tensors) from a LowBit layer's params."""
        return {f: lowbit_params[f] for f in cls.param_fields}

    @classmethod
    def requantize_kwargs(cls, qtensor):
        return {f: getattr(qtensor._params, f) for f in cls.param_fields}

    @classmethod
    def make_params(cls, tensor: torch.Tensor, tensors: dict, **fields):
        """Params of `tensor` (its logical shape and dtype) quantized to the LowBit `tensors`."""
        return cls.Params(scale=tensors[cls.scale_name], orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape),
                          **{cls.extra_name: tensors[cls.extra_name]}, **fields)

    @classmethod
    def layer(cls, qdata: torch.Tensor, params, bias: Optional[torch.Tensor] = None,
              conv: Optional[tuple] = None) -> QuantizedLayer:
        """The LowBit layer of the stored (untransposed) weight; conv = (stride, padding, dilation) for a Conv2d."""
        shape = physical_shape(params)
        tensors = {cls.qdata_name: qdata, cls.scale_name: params.scale, **cls.extra_tensors(params)}
        bias = None if bias is None else bias.detach()
        if len(shape) == 4:
            return LowBitConv2d(cls.lowbit_layout, cls.lowbit_params(params), shape, params.orig_dtype, tensors,
                                bias, *(conv or ((1, 1), (0, 0), (1, 1))))
        return LowBitLinear(cls.lowbit_layout, cls.lowbit_params(params), shape, params.orig_dtype, tensors, bias)

    @classmethod
    def dequantize(cls, qdata, params):
        return cls.layer(qdata, params).dequantize_weight(params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor):
        return (qtensor._qdata, qtensor._params.scale, *cls.extra_tensors(qtensor._params).values())

    @classmethod
    def state_dict_tensors(cls, qdata, params):
        return {"": qdata, "_scale": params.scale,
                **{f"_{name}": t for name, t in cls.extra_tensors(params).items()}}


class LowBitIntAffineLayout(_LowBitLayout):
    """LowBit `int_affine`: asymmetric integer codes with per-row/per-group scale and zero point."""

    lowbit_layout, qdata_name, scale_name, extra_name = "int_affine", "qweight", "scale", "zero"
    param_fields = ("bits", "group_size")

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        zero: torch.Tensor
        bits: int
        group_size: int
        transposed: bool = False

        def _tensor_fields(self):
            return ["scale", "zero"]

    @classmethod
    def quantize(cls, tensor, bits: int = 4, group_size: int = 128, range_search: bool = False, **kwargs):
        tensors = quantize_int_affine(matrix_view(tensor.detach()), bits, group_size, range_search)
        return tensors["qweight"], cls.make_params(tensor, tensors, bits=bits, group_size=group_size)


class LowBitVQLayout(_LowBitLayout):
    """LowBit `vq`: additive codebooks (M x 256 codewords of g weights) times a per-row scale."""

    lowbit_layout, qdata_name, scale_name, extra_name = "vq", "codes", "scales", "codebooks"
    param_fields = ("num_codebooks", "group_size")
    fixed_params = {"codebook_bits": CODEBOOK_BITS}

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        codebooks: torch.Tensor
        num_codebooks: int
        group_size: int
        transposed: bool = False

        def _tensor_fields(self):
            return ["scale", "codebooks"]

    @classmethod
    def quantize(cls, tensor, num_codebooks: int = 3, group_size: int = 8, seed: int = 0, **fit_options):
        fit = fit_vq(matrix_view(tensor.detach()), None, num_codebooks, group_size=group_size, seed=seed,
                     **fit_options)
        tensors = {"codes": fit.codes, "scales": fit.scales, "codebooks": fit.codebooks}
        return fit.codes, cls.make_params(tensor, tensors, num_codebooks=num_codebooks, group_size=group_size)


KITCHEN_LAYOUTS = {cls.lowbit_layout: cls for cls in (LowBitIntAffineLayout, LowBitVQLayout)}


def physical_shape(params) -> tuple:
    """Shape of the stored weight: the logical shape, un-swapped when the tensor is a transposed view."""
    shape = tuple(params.orig_shape)
    return shape[::-1] if params.transposed else shape


def to_quantized_tensor(layer: QuantizedLayer) -> QuantizedTensor:
    """A LowBit layer's weight as a QuantizedTensor over the same packed tensors (no copy; bias not included)."""
    cls = KITCHEN_LAYOUTS[layer.layout.name]
    tensors = {name: t.detach() for name, t in layer.packed_tensors().items()}
    extra = {name: tensors[name] for name in tensors if name not in (cls.qdata_name, cls.scale_name)}
    params = cls.Params(scale=tensors[cls.scale_name], orig_dtype=layer.weight_dtype,
                        orig_shape=tuple(layer.weight_shape), **extra, **cls.fields_of(layer.params))
    return QuantizedTensor(tensors[cls.qdata_name], cls.__name__, params)


def from_quantized_tensor(qt: QuantizedTensor, bias: Optional[torch.Tensor] = None) -> QuantizedLayer:
    """The LowBit layer (Linear, or Conv2d for a 4-D weight with default geometry) over a QuantizedTensor's data."""
    return layout_of(qt).layer(qt._qdata, qt._params, bias)


def layout_of(qt) -> Optional[type]:
    """The LowBit kitchen layout of a QuantizedTensor, None for anything else."""
    if isinstance(qt, QuantizedTensor):
        cls = KITCHEN_LAYOUTS.get(getattr(qt.layout_cls, "lowbit_layout", None))
        return cls if cls is not None and qt._layout_cls == cls.__name__ else None
    return None


# ---- op handlers: anything not handled here falls back to comfy_kitchen's dequantize-and-run ------------------

def _transpose(qt, args, kwargs):
    w = args[0]
    if w.dim() != 2:
        return torch.ops.aten.t.default(*dequantize_args(args))
    params = dataclasses.replace(w._params, orig_shape=tuple(w._params.orig_shape)[::-1],
                                 transposed=not w._params.transposed)
    return QuantizedTensor(w._qdata, w._layout_cls, params)


def _linear(x, weight, bias):
    """x @ W.T + bias through the dispatcher (the same arithmetic as the LowBit layer)."""
    if isinstance(x, QuantizedTensor):
        x = x.dequantize()
    cls = layout_of(weight)
    fused_bias = bias if bias is None or bias.dim() == 1 else None
    y = ops.linear(x, cls.layer(weight._qdata, weight._params, fused_bias))
    return y if fused_bias is not None or bias is None else y + bias


def _handle_linear(qt, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if layout_of(weight) is None or weight._params.transposed:
        return torch.nn.functional.linear(*dequantize_args((x, weight, bias)))
    return _linear(x, weight, bias)


def _handle_mm(qt, args, kwargs):
    x, weight = args[0], args[1]
    if layout_of(weight) is None or not weight._params.transposed:  # only linear's x @ W.t() is fused
        return torch.mm(*dequantize_args(args))
    return _linear(x, weight, None)


def _handle_addmm(qt, args, kwargs):
    bias, x, weight = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if layout_of(weight) is None or not weight._params.transposed or beta != 1 or alpha != 1:
        return torch.addmm(*dequantize_args(args), **dequantize_args(kwargs))
    return _linear(x, weight, bias)


def _handle_convolution(qt, args, kwargs):
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if layout_of(weight) is None or transposed or groups != 1 or weight.dim() != 4:
        return torch.ops.aten.convolution.default(*dequantize_args(args))
    if isinstance(x, QuantizedTensor):
        x = x.dequantize()
    layer = layout_of(weight).layer(weight._qdata, weight._params, bias, (stride, padding, dilation))
    return ops.conv2d(x, layer)


for _cls in KITCHEN_LAYOUTS.values():
    register_layout_class(_cls.__name__, _cls)
    for _op, _handler in ((torch.ops.aten.t.default, _transpose), (torch.ops.aten.linear.default, _handle_linear),
                          (torch.ops.aten.mm.default, _handle_mm), (torch.ops.aten.addmm.default, _handle_addmm),
                          (torch.ops.aten.convolution.default, _handle_convolution)):
        register_layout_op(_op, _cls)(_handler)
