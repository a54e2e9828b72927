"""The ops table: which implementation runs each op of a quantized layer.

Ops, per layout:
  "decode"       packed tensors -> the dense weight in its logical shape ([N, K] or [N, in, kh, kw])
  "linear"       fused dequantize-and-multiply for a Linear (for the inputs its kernel says it serves)
  "int8_linear"  integer activation codes × integer weight codes (W8A8 / W4A8 on int_affine weights)
Every op has its torch reference on this floor: the layout's own `dequantize` (lowbit.quant_core.layouts) for
the weight-only ops, lowbit.quant_core.reference for the integer path. A fast implementation registers with
`register_kernel(layout, op, name, fn, usable)` (lowbit.kernels does, when the package is imported) and runs
when `usable(x)` accepts the input and the reference is not forced. Nothing here imports a kernel.

Forcing the reference is scoped: `with reference_only(): ...` covers the code inside the block, in that thread
(a context variable, so a ComfyUI worker thread is not affected by another thread's block), and the
environment variable LOWBIT_FORCE_REFERENCE=1 forces it for the whole process.

A kernel that fails to compile or launch logs one warning, and the reference runs for that call and every later
call of that kernel on that device and dtype (`kernel_failures()` lists them).

Kernel signatures (tensors: the layer's packed tensors by the layout's tensor names, on the input's device):
  decode(tensors, params, weight_shape, dtype) -> dense weight
  linear(x2, tensors, params, bias) -> y2 [rows, N]
  int8_linear(x2, tensors, params, act, bias, out_dtype, cache) -> y2 [rows, N]; `cache` is a dict that lives
  as long as the layer (for per-layer precomputations such as weight-code sums)
"""
import contextlib
import contextvars
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import reference
from .layouts import conv_output_size, im2col_rows

OPS = ("decode", "linear", "int8_linear")


@dataclass(frozen=True)
class Kernel:
    name: str  # for warnings and kernel_failures()
    fn: Callable
    usable: Callable[[torch.Tensor], bool]  # may this kernel run on this input (device, dtype, rows)?


_KERNELS: dict = {}  # {(layout name, op): Kernel}


def register_kernel(layout: str, op: str, name: str, fn: Callable, usable: Callable[[torch.Tensor], bool]) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    _KERNELS[(layout, op)] = Kernel(name, fn, usable)


def registered_kernels() -> dict:
    return dict(_KERNELS)


# ---- forcing the reference (scoped) -------------------------------------------------------------------------

_reference_only = contextvars.ContextVar("lowbit_reference_only", default=False)


@contextlib.contextmanager
def reference_only(enabled: bool = True):
    """Inside the block every op runs its torch reference (enabled=False: kernels allowed again)."""
    token = _reference_only.set(enabled)
    try:
        yield
    finally:
        _reference_only.reset(token)


def reference_forced() -> bool:
    return _reference_only.get() or os.environ.get("LOWBIT_FORCE_REFERENCE", "") == "1"


def _kernel(layout: str, op: str, x: torch.Tensor) -> Optional[Kernel]:
    kernel = _KERNELS.get((layout, op))
    if kernel is None or reference_forced() or not kernel.usable(x):
        return None
    return kernel


# ---- kernel failures: one warning, then the reference -------------------------------------------------------

# {(kernel, device, dtype): "ErrorType: message"}: not tried again, so a broken kernel costs one warning and no
# recompilation on every forward
_failed_kernels: dict = {}


def kernel_failures() -> dict:
    """{(kernel, device, dtype): error} of the kernels that fell back to the torch reference in this process."""
    return dict(_failed_kernels)


def forget_kernel_failure(name: str, device, dtype) -> None:
    """Let a kernel that failed on this device and dtype be tried again (after a forced failure)."""
    _failed_kernels.pop((name, str(device), dtype), None)


def kernel_or_reference(name: str, device, dtype, kernel, reference_fn):
    """kernel() where `name` has not failed on this device and dtype, else reference_fn(). The first failure
    (Triton's CompilationError or OutOfResources, a ptxas or driver error...) is remembered and logged once:
    a kernel that cannot be built for the user's GPU costs speed, never the workflow."""
    key = (name, str(device), dtype)
    if key not in _failed_kernels:
        try:
            return kernel()
        except torch.cuda.OutOfMemoryError:
            raise  # memory pressure is the host's to handle (ComfyUI offloads and retries), not a kernel fault
        except Exception as e:
            lines = str(e).strip().splitlines()
            _failed_kernels[key] = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
            logging.warning("LowBit: kernel %s failed on %s for %s input (%s); the torch reference runs "
                            "instead for this kernel from now on (same results, slower)",
                            name, device, str(dtype).replace("torch.", ""), _failed_kernels[key])
    return reference_fn()


# ---- weight-only ops ----------------------------------------------------------------------------------------

def _bias(layer, x):
    return None if layer.bias is None else layer.bias.to(x.device, x.dtype, non_blocking=True)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a 2-D [rows, K] with unit stride along K, as the kernels read it."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _tensors_on(layer, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in layer.packed_tensors().items()}


def decode(layer, like: torch.Tensor) -> torch.Tensor:
    """The layer's dense weight (logical shape) in like's dtype on like's device: the registered decode kernel
    where usable, else the layout's reference. The packed tensors move to that device first if they are
    elsewhere (a layer ComfyUI left in CPU memory)."""
    kernel = _kernel(layer.layout.name, "decode", like)
    if kernel is None:
        return layer.dequantize_weight(like.dtype, like.device)
    return kernel_or_reference(kernel.name, like.device, like.dtype,
                               lambda: kernel.fn(_tensors_on(layer, like.device), layer.params, layer.weight_shape,
                                                 like.dtype),
                               lambda: layer.dequantize_weight(like.dtype, like.device))


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    bias = _bias(layer, x)
    kernel = _kernel(layer.layout.name, "linear", x)
    if kernel is None:
        return F.linear(x, decode(layer, x), bias)
    x2 = _rows(x, layer.in_features)
    y = kernel_or_reference(kernel.name, x.device, x.dtype,
                            lambda: kernel.fn(x2, _tensors_on(layer, x.device), layer.params, bias),
                            lambda: F.linear(x2, layer.dequantize_weight(x.dtype, x.device), bias))
    return y.reshape(*x.shape[:-1], layer.out_features)


def conv2d(x: torch.Tensor, layer) -> torch.Tensor:
    return F.conv2d(x, decode(layer, x), _bias(layer, x), layer.stride, layer.padding, layer.dilation)


# ---- integer activations (W8A8 / W4A8 on int_affine weights) --------------------------------------------

@dataclass(frozen=True)
class ActivationQuant:
    """How an integer-activation layer quantizes its input (asymmetric, `bits` <= 8).

    scale (fp32) and zero (unsigned, in [0, 2^bits − 1]) must broadcast to [rows, G]: shape [] or [1, 1] per
    tensor, [rows, 1] per row (pixel/token groups), [1, G] per K-group of `group_k` consecutive channels
    (channel groups). scale None: per-row min-max computed on the fly (group_k must be 0).
    perm: channel order the weight's K was permuted to (so channel groups are contiguous); the input is
    gathered in that order before quantization. K is the layer's matrix-view K (Conv2d: tap-major, input
    channel fastest).
    """
    bits: int = 8
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    group_k: int = 0
    perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"activation bits must be 1..8, got {self.bits}")
        if (self.scale is None) != (self.zero is None):
            raise ValueError("activation scale and zero must be given together (or neither: dynamic per row)")
        if self.scale is None and self.group_k:
            raise ValueError("dynamic per-row activation quantization has no K-groups (group_k must be 0)")


def quantize_input(quantizer, x2, act: ActivationQuant):
    """(xq, xsum, x_scale, x_zero) with `quantizer` (the reference module or a kernel module offering
    quantize_dynamic_rows / quantize_static with the reference's signatures)."""
    if act.scale is None:
        return quantizer.quantize_dynamic_rows(x2, act.bits, act.perm)
    xq, xsum = quantizer.quantize_static(x2, act.scale, act.zero, act.bits, act.group_k, act.perm)
    return xq, xsum, act.scale, act.zero


def _int8_reference(x2, tensors, params, act, bias, out_dtype):
    xq, _, x_scale, x_zero = quantize_input(reference, x2, act)
    return reference.int8_linear(xq, x_scale, x_zero, tensors["qweight"], tensors["scale"], tensors["zero"],
                                 params["bits"], act.group_k, bias, out_dtype)


# per layer: a dict the int8 kernel keeps its precomputations in; dropped with the layer
_layer_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _int8_matmul(x2, layer, act: ActivationQuant, bias, out_dtype):
    p = layer.params
    if layer.layout.name != "int_affine" or p["group_size"] != 0:
        raise ValueError(f"integer activations need int_affine weights with one group per output channel "
                         f"(group_size 0); got {layer.layout.name} {p}")
    tensors = _tensors_on(layer, x2.device)
    kernel = _kernel(layer.layout.name, "int8_linear", x2)
    if kernel is None:
        return _int8_reference(x2, tensors, p, act, bias, out_dtype)
    cache = _layer_caches.setdefault(layer, {})
    # activation quantization and GEMM fail over together: the reference's codes feed only the reference GEMM
    return kernel_or_reference(kernel.name, x2.device, x2.dtype,
                               lambda: kernel.fn(x2, tensors, p, act, bias, out_dtype, cache),
                               lambda: _int8_reference(x2, tensors, p, act, bias, out_dtype))


def int8_linear(x, layer, act: ActivationQuant):
    """Forward of an int_affine Linear with quantized activations: quantize x, integer GEMM, dequantize."""
    y = _int8_matmul(_rows(x, layer.in_features), layer, act, _bias(layer, x), x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def int8_conv2d(x, layer, act: ActivationQuant):
    """Conv2d with quantized activations through an explicit im2col in matrix-view order (tap-major, input
    channel fastest) and the integer GEMM; an implicit-GEMM int8 conv is pending GPU measurement."""
    n_out, _, kh, kw = layer.weight_shape
    rows = im2col_rows(x, (kh, kw), layer.stride, layer.padding, layer.dilation)
    y = _int8_matmul(rows, layer, act, _bias(layer, x), x.dtype)
    h_out, w_out = (conv_output_size(x.shape[2 + i], (kh, kw)[i], layer.stride[i], layer.padding[i],
                                     layer.dilation[i]) for i in range(2))
    return y.reshape(x.shape[0], h_out, w_out, n_out).permute(0, 3, 1, 2).contiguous()
