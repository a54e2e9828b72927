"""LowBit's Triton kernels, registered into the core's ops table (lowbit.quant_core.ops) on import.

A kernel runs when the input is a CUDA tensor, Triton is importable, the reference is not forced
(lowbit.quant_core.ops.reference_only, LOWBIT_FORCE_REFERENCE=1), and `kernel_dtypes` allows the input's
dtype on the GPU's compute capability:

    input dtypes served by kernels   sm_80 and newer (A100, RTX 30/40, H100)   sm_75 (RTX 20, T4)   older
    weight-only (int_affine, vq)     fp16, bf16                              fp16                 none
    integer activations (W8A8/W4A8)  fp16, bf16, fp32                        none                 none

This follows the compile matrix (kernels/targets.py, tests/test_kernel_targets.py). On sm_75, Triton cannot
lower the int8 tl.dot (its matmul pass fails), so the integer path runs the torch reference there. The
weight-only kernels compile for both fp16 and bf16 on sm_75, but Turing has no bf16 tensor cores, so bf16 stays
on the reference. The sm_75 kernels have only been compiled, never run: no Turing GPU was at hand to check them.
Otherwise the ops table runs the torch reference (the layout's dequantize + F.linear / F.conv2d; the integer
path of lowbit.quant_core.reference, which computes the same integers exactly). CPU tensors never reach Triton.

Weight-only kernels per layout: Linear with at most FUSED_MAX_ROWS[layout] input rows -> the fused
dequantize-and-multiply GEMM (meant for the memory-bound regime: it reads only the packed weight); more rows
-> a Triton decode of the dense weight into scratch followed by cuBLAS. Measured on an H200 (`python -m lowbit
bench gpu`, bench/results/gpu/): the fused GEMMs' per-tile decode made them 4-12x slower than fp16 cuBLAS at
M = 16 and 5-24x at M >= 2048, decode + cuBLAS 1.2-4x, so decode + cuBLAS runs everywhere for now.
Conv2d -> the decode followed by cuDNN.
"""
import functools
import importlib.util

import torch

from ..quant_core import ops, reference

WEIGHT_ONLY_DTYPES = (torch.float16, torch.bfloat16)
INT8_PATH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    return (x.is_cuda and x.dtype in dtypes
            and _device_supported(x.device.index if x.device.index is not None else torch.cuda.current_device(),
                                  x.dtype, dtypes))


# rows (tokens x batch) up to which the fused GEMM runs; above, decode + cuBLAS. 0: decode + cuBLAS always: on
# an H200 it beat the fused GEMMs at every measured shape, M = 16 to 8192 (bench/results/gpu/); M = 1 is not
# measured yet
FUSED_MAX_ROWS = {"int_affine": 0, "vq": 0}


# ---- launchers (the ops table's kernel signatures, lowbit.quant_core.ops) ------------------------------------

def _affine_linear(x2, t, p, bias):
    from .affine_gemm import affine_linear
    return affine_linear(x2, t["qweight"], t["scale"], t["zero"], p["bits"], p["group_size"], bias)


def _affine_decode(t, p, weight_shape, dtype):
    from .affine_gemm import affine_decode
    return affine_decode(t["qweight"], t["scale"], t["zero"], p["bits"], p["group_size"], weight_shape, dtype)


def _vq_linear(x2, t, p, bias):
    from .vq_gemm import vq_linear
    return vq_linear(x2, t["codes"], t["codebooks"], t["scales"], bias)


def _vq_decode(t, p, weight_shape, dtype):
    from .vq_gemm import vq_decode
    return vq_decode(t["codes"], t["codebooks"], t["scales"], weight_shape, dtype)


def _int8_linear(x2, t, p, act, bias, out_dtype, cache):
    from . import act_quant
    from .int8_gemm import int8_linear
    key = (act.group_k, t["qweight"].device, t["qweight"].data_ptr())
    if key not in cache:  # Σ of the weight codes per K-group: once per layer
        cache[key] = reference.weight_sums(t["qweight"], p["bits"], act.group_k)
    xq, xsum, x_scale, x_zero = ops.quantize_input(act_quant, x2, act)
    return int8_linear(xq, xsum, x_scale, x_zero, t["qweight"], t["scale"], t["zero"], cache[key], p["bits"],
                       act.group_k, bias, out_dtype)


# usable(x) predicates look `kernels_usable` and FUSED_MAX_ROWS up at call time, so tests can replace them
def _weight_only_usable(x):
    return kernels_usable(x)


def _fused_usable(layout):
    def usable(x):
        return kernels_usable(x) and x.numel() // max(1, x.shape[-1]) <= FUSED_MAX_ROWS[layout]
    return usable


def _int8_usable(x):
    return kernels_usable(x, INT8_PATH_DTYPES)


def register() -> None:
    ops.register_kernel("int_affine", "decode", "affine_decode", _affine_decode, _weight_only_usable)
    ops.register_kernel("int_affine", "linear", "affine_linear", _affine_linear, _fused_usable("int_affine"))
    ops.register_kernel("vq", "decode", "vq_decode", _vq_decode, _weight_only_usable)
    ops.register_kernel("vq", "linear", "vq_linear", _vq_linear, _fused_usable("vq"))
    ops.register_kernel("int_affine", "int8_linear", "act_quant + int8_gemm", _int8_linear, _int8_usable)


register()
