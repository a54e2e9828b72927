"""The one place where a quantized layer's forward picks its implementation.

Triton kernels run when the input is a CUDA tensor, Triton is importable, the reference is not forced
(`force_reference(True)` or the environment variable LOWBIT_FORCE_REFERENCE=1), and `kernel_dtypes` allows the
input's dtype on the GPU's compute capability:

    input dtypes served by kernels   sm_80 and newer (A100, RTX 30/40, H100)   sm_75 (RTX 20, T4)   older
    weight-only (int_affine, vq)     fp16, bf16                              fp16                 none
    integer activations (W8A8/W4A8)  fp16, bf16, fp32                        none                 none

This follows the compile matrix (kernels/targets.py, tests/test_kernel_targets.py). On sm_75, Triton cannot
lower the int8 tl.dot (its matmul pass fails), so the integer path runs the twins there. The weight-only
kernels compile for both fp16 and bf16 on sm_75, but Turing has no bf16 tensor cores, so bf16 stays on the
reference. The sm_75 kernels have only been compiled, never run: no Turing GPU was at hand to check them
against the twins.
Otherwise the torch reference runs: for weight-only layouts the layout's own dequantize followed by
F.linear / F.conv2d in the input's dtype; for integer-activation layers the kernels' twins
(lowbit.kernels.twins), which compute the same integers exactly. CPU tensors never reach Triton. A kernel that
fails to compile or launch on the user's machine logs one warning, and the reference runs for that call and
every later call of that kernel on that device and dtype (`_kernel_or_reference`).

Weight-only kernels per layout: Linear with at most FUSED_MAX_ROWS[layout] input rows -> the fused
dequantize-and-multiply GEMM (meant for the memory-bound regime: it reads only the packed weight); more rows
-> a Triton decode of the dense weight into scratch followed by cuBLAS. Measured on an H200 (`python -m lowbit
bench gpu`, bench/results/gpu/): the fused GEMMs' per-tile decode made them 4-12x slower than fp16 cuBLAS at
M = 16 and 5-24x at M >= 2048, decode + cuBLAS 1.2-4x, so decode + cuBLAS runs everywhere for now.
Conv2d -> the decode followed by cuDNN.
"""
import contextlib
import functools
import importlib.util
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import twins

_force_reference = os.environ.get("LOWBIT_FORCE_REFERENCE", "") == "1"

WEIGHT_ONLY_DTYPES = (torch.float16, torch.bfloat16)
INT8_PATH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def force_reference(enabled: bool = True) -> None:
    global _force_reference
    _force_reference = enabled


def reference_forced() -> bool:
    return _force_reference


@contextlib.contextmanager
def reference_only(enabled: bool = True):
    """force_reference(enabled) inside a with-block; the previous setting comes back after it."""
    before = _force_reference
    force_reference(enabled)
    try:
        yield
    finally:
        force_reference(before)


def kernel_dtypes(capability, dtypes=WEIGHT_ONLY_DTYPES) -> tuple:
    """The activation dtypes of a launch path (WEIGHT_ONLY_DTYPES or INT8_PATH_DTYPES) whose kernels run on a
    GPU of this compute capability (table in the module docstring)."""
    if tuple(capability) >= (8, 0):
        return tuple(dtypes)
    if tuple(capability) >= (7, 5) and tuple(dtypes) == WEIGHT_ONLY_DTYPES:
        return (torch.float16,)
    return ()


@functools.lru_cache(maxsize=None)
def _device_supported(device_index: int, dtype: torch.dtype, dtypes=WEIGHT_ONLY_DTYPES) -> bool:
    return (importlib.util.find_spec("triton") is not None
            and dtype in kernel_dtypes(torch.cuda.get_device_capability(device_index), dtypes))


def kernels_usable(x: torch.Tensor, dtypes=WEIGHT_ONLY_DTYPES) -> bool:
    """Whether the Triton kernels of the launch path taking `dtypes` may run on input x (module docstring).
    Tests and the bench dry run replace this function to send CPU tensors down the kernel paths."""
    return (not _force_reference and x.is_cuda and x.dtype in dtypes
            and _device_supported(x.device.index if x.device.index is not None else torch.cuda.current_device(),
                                  x.dtype, dtypes))


# ---- kernel failures: one warning, then the torch reference ------------------------------------------------

# {(kernel, device, dtype): "ErrorType: message"} of the kernels that failed to compile or launch there; they are
# not tried again, so a broken kernel costs one warning and no recompilation on every forward
_failed_kernels: dict = {}


def kernel_failures() -> dict:
    """{(kernel, device, dtype): error} of the kernels that fell back to the torch reference in this process."""
    return dict(_failed_kernels)


def forget_kernel_failure(name: str, device, dtype) -> None:
    """Let a kernel that failed on this device and dtype be tried again (after a forced failure)."""
    _failed_kernels.pop((name, str(device), dtype), None)


def _kernel_or_reference(name: str, device, dtype, kernel, reference):
    """kernel() where `name` has not failed on this device and dtype, else reference(). The first failure
    (Triton's CompilationError or OutOfResources, a ptxas or driver error...) is remembered and logged once:
    a kernel Triton cannot build for the user's GPU costs speed, never the workflow."""
    key = (name, str(device), dtype)
    if key not in _failed_kernels:
        try:
            return kernel()
        except torch.cuda.OutOfMemoryError:
            raise  # memory pressure is the host's to handle (ComfyUI offloads and retries), not a kernel fault
        except Exception as e:
            lines = str(e).strip().splitlines()
            _failed_kernels[key] = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
            logging.warning("LowBit: Triton kernel %s failed on %s for %s input (%s); the torch reference runs "
                            "instead for this kernel from now on (same results, slower)",
                            name, device, str(dtype).replace("torch.", ""), _failed_kernels[key])
    return reference()


def _bias(layer, x):
    return None if layer.bias is None else layer.bias.to(x.dtype)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a 2-D [rows, K] with unit stride along K, as the kernels read it."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


# ---- weight-only layouts: {layout name: (fused linear, dense-weight decode)} ------------------------------

def _affine_linear(x2, layer, bias):
    from .affine_gemm import affine_linear
    p = layer.params
    return affine_linear(x2, layer.qweight, layer.scale, layer.zero, p["bits"], p["group_size"], bias)


def _affine_decode(layer, dtype):
    from .affine_gemm import affine_decode
    p = layer.params
    return affine_decode(layer.qweight, layer.scale, layer.zero, p["bits"], p["group_size"], layer.weight_shape,
                         dtype)


def _vq_linear(x2, layer, bias):
    from .vq_gemm import vq_linear
    return vq_linear(x2, layer.codes, layer.codebooks, layer.scales, bias)


def _vq_decode(layer, dtype):
    from .vq_gemm import vq_decode
    return vq_decode(layer.codes, layer.codebooks, layer.scales, layer.weight_shape, dtype)


def _guarded_linear(name, fused):
    """fused(x2, layer, bias) with the layout's dequantize + F.linear as the fallback."""
    def run(x2, layer, bias):
        return _kernel_or_reference(name, x2.device, x2.dtype, lambda: fused(x2, layer, bias),
                                    lambda: F.linear(x2, layer.dequantize_weight(x2.dtype), bias))
    return run


def _guarded_decode(name, decode):
    """decode(layer, dtype) with the layout's dequantize as the fallback."""
    def run(layer, dtype):
        return _kernel_or_reference(name, layer.weight.device, dtype, lambda: decode(layer, dtype),
                                    lambda: layer.dequantize_weight(dtype))
    return run


WEIGHT_ONLY_KERNELS = {
    "int_affine": (_guarded_linear("affine_linear", _affine_linear), _guarded_decode("affine_decode", _affine_decode)),
    "vq": (_guarded_linear("vq_linear", _vq_linear), _guarded_decode("vq_decode", _vq_decode))}
# rows (tokens x batch) up to which the fused GEMM runs; above, decode + cuBLAS (`python -m lowbit bench gpu`
# measures both at every SDXL shape)
# (0: decode + cuBLAS always: on an H200 it beat the fused GEMMs at every measured shape, M = 16 to 8192,
# bench/results/gpu/NVIDIA_H200_2026-12-04.json; M = 1 is not measured yet)
FUSED_MAX_ROWS = {"int_affine": 0, "vq": 0}


def linear(x, layer):
    kernels = WEIGHT_ONLY_KERNELS.get(layer.layout.name)
    if kernels is not None and kernels_usable(x):
        x2 = _rows(x, layer.in_features)
        if x2.shape[0] <= FUSED_MAX_ROWS[layer.layout.name]:
            y = kernels[0](x2, layer, _bias(layer, x))
        else:
            y = F.linear(x2, kernels[1](layer, x.dtype), _bias(layer, x))
        return y.reshape(*x.shape[:-1], layer.out_features)
    return F.linear(x, layer.dequantize_weight(x.dtype), _bias(layer, x))


def conv2d(x, layer):
    kernels = WEIGHT_ONLY_KERNELS.get(layer.layout.name)
    if kernels is not None and kernels_usable(x):
        weight = kernels[1](layer, x.dtype)
    else:
        weight = layer.dequantize_weight(x.dtype)
    return F.conv2d(x, weight, _bias(layer, x), layer.stride, layer.padding, layer.dilation)


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


# per layer: {(group_k, device, qweight storage): int32 [N, G] weight-code sums}; dropped with the layer
_weight_sums_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weight_sums(layer, group_k):
    key = (group_k, layer.qweight.device, layer.qweight.data_ptr())
    per_layer = _weight_sums_cache.setdefault(layer, {})
    if key not in per_layer:
        per_layer[key] = twins.weight_sums(layer.qweight, layer.params["bits"], group_k)
    return per_layer[key]


def _quantize_input(quantizer, x2, act: ActivationQuant):
    """(xq, xsum, x_scale, x_zero) by act_quant (kernels) or twins (reference)."""
    if act.scale is None:
        xq, xsum, x_scale, x_zero = quantizer.quantize_dynamic_rows(x2, act.bits, act.perm)
    else:
        xq, xsum = quantizer.quantize_static(x2, act.scale, act.zero, act.bits, act.group_k, act.perm)
        x_scale, x_zero = act.scale, act.zero
    return xq, xsum, x_scale, x_zero


def _int8_by_kernels(x2, layer, act, bias, out_dtype):
    from . import act_quant
    from .int8_gemm import int8_linear
    xq, xsum, x_scale, x_zero = _quantize_input(act_quant, x2, act)
    return int8_linear(xq, xsum, x_scale, x_zero, layer.qweight, layer.scale, layer.zero,
                       _weight_sums(layer, act.group_k), layer.params["bits"], act.group_k, bias, out_dtype)


def _int8_by_twins(x2, layer, act, bias, out_dtype):
    xq, _, x_scale, x_zero = _quantize_input(twins, x2, act)
    return twins.int8_linear(xq, x_scale, x_zero, layer.qweight, layer.scale, layer.zero, layer.params["bits"],
                             act.group_k, bias, out_dtype)


def _int8_matmul(x2, layer, act: ActivationQuant, bias, out_dtype):
    p = layer.params
    if layer.layout.name != "int_affine" or p["group_size"] != 0:
        raise ValueError(f"integer activations need int_affine weights with one group per output channel "
                         f"(group_size 0); got {layer.layout.name} {p}")
    if not kernels_usable(x2, INT8_PATH_DTYPES):
        return _int8_by_twins(x2, layer, act, bias, out_dtype)
    # activation quantization and GEMM fail over together: the twins' codes feed only the twin GEMM
    return _kernel_or_reference("act_quant + int8_gemm", x2.device, x2.dtype,
                                lambda: _int8_by_kernels(x2, layer, act, bias, out_dtype),
                                lambda: _int8_by_twins(x2, layer, act, bias, out_dtype))


def int8_linear(x, layer, act: ActivationQuant):
    """Forward of an int_affine Linear with quantized activations: quantize x, integer GEMM, dequantize."""
    y = _int8_matmul(_rows(x, layer.in_features), layer, act, _bias(layer, x), x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def int8_conv2d(x, layer, act: ActivationQuant):
    """Conv2d with quantized activations through an explicit im2col in matrix-view order (tap-major, input
    channel fastest) and the integer GEMM; an implicit-GEMM int8 conv is pending GPU measurement."""
    n_out, cin, kh, kw = layer.weight_shape
    cols = F.unfold(x, (kh, kw), dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    batch, _, positions = cols.shape
    rows = cols.reshape(batch, cin, kh * kw, positions).permute(0, 3, 2, 1).reshape(batch * positions, -1)
    y = _int8_matmul(rows, layer, act, _bias(layer, x), x.dtype)
    h_out = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
    return y.reshape(batch, h_out, positions // h_out, n_out).permute(0, 3, 1, 2).contiguous()
