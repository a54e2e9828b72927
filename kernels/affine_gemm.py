"""Weight-only kernels for the `int_affine` layout (RTN and other scalar weight quantizers).

`affine_linear`: y = x @ Ŵᵀ + bias with Ŵ = (q − zero)·scale rebuilt tile by tile in registers (fp32, then
the activation dtype) and fed to tl.dot with fp32 accumulation. Any bit width 1..8 and group size.
`affine_decode`: writes the dense weight (Linear [N, K] or Conv2d [N, in, kh, kw]) for the cuDNN path.
References: lowbit.quant_core.reference.affine_linear / affine_decode.
"""
import torch
import triton
import triton.language as tl

from .tiles import (decode_blocks, launch_weight_only, load_packed_tile, split_k_range,
                    store_dense_weight, swizzled_tile, tuned_pair, weight_only_epilogue)


@triton.jit
def affine_weight_tile(q_ptr, scale_ptr, zero_ptr, row_bytes, n_groups, group_size, offs_k, offs_n, K, N,
                       BITS: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of Ŵᵀ: (q − zero[n, k // group_size]) · scale[n, k // group_size]."""
    q = load_packed_tile(q_ptr, row_bytes, offs_k, offs_n, K, N, BITS)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    at = offs_n[None, :] * n_groups + (offs_k // group_size)[:, None]
    scale = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + at, mask=mask, other=0).to(tl.float32)
    return (q.to(tl.float32) - zero) * scale


@triton.jit
def _affine_gemm_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, M, N, K, stride_xm, stride_ym,
                        q_ptr, wscale_ptr, wzero_ptr, row_bytes, n_groups, group_size,
                        BITS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = affine_weight_tile(q_ptr, wscale_ptr, wzero_ptr, row_bytes, n_groups, group_size,
                               offs_k, offs_n, K, N, BITS)
        acc = tl.dot(x, w.to(x.dtype), acc)
    weight_only_epilogue(acc, offs_m, offs_n, M, N, pid_k, y_ptr, stride_ym, scale_ptr, bias_ptr,
                         HAS_SCALE, HAS_BIAS, SPLIT_K)


_affine_gemm_tuned = tuned_pair(_affine_gemm_kernel)


@triton.jit
def _affine_decode_kernel(q_ptr, scale_ptr, zero_ptr, row_bytes, n_groups, group_size, out_ptr, N, K, CIN, TAPS,
                          BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = affine_weight_tile(q_ptr, scale_ptr, zero_ptr, row_bytes, n_groups, group_size, offs_k, offs_n, K, N, BITS)
    store_dense_weight(out_ptr, w, offs_k, offs_n, K, N, CIN, TAPS)


def _layout_args(qweight, scale, zero, group_size, K):
    return (qweight, scale, zero, qweight.shape[1], scale.shape[1], group_size or K)


def affine_linear(x2, qweight, scale, zero, bits, group_size, bias=None, config=None):
    """y [M, N] in x2's dtype (fp16/bf16) = x2 [M, K] @ Ŵᵀ + bias; x2 needs unit stride along K."""
    return launch_weight_only(_affine_gemm_kernel, _affine_gemm_tuned, x2, qweight.shape[0],
                              _layout_args(qweight, scale, zero, group_size, x2.shape[1]), {"BITS": bits},
                              None, bias, config)


def affine_decode(qweight, scale, zero, bits, group_size, weight_shape, dtype, block_n=None, block_k=None):
    """Dense weight of logical shape weight_shape ([N, K] or [N, in, kh, kw]) in dtype."""
    block_n, block_k = decode_blocks(block_n, block_k, gpu_default=(32, 128))
    n_out, cin = weight_shape[0], weight_shape[1]
    K = qweight.shape[1] * 8 // bits
    out = torch.empty(weight_shape, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(K, block_k))
    _affine_decode_kernel[grid](*_layout_args(qweight, scale, zero, group_size, K), out, n_out, K, cin, K // cin,
                                BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
