"""Integer GEMM for W8A8 and W4A8 (any weight width 2..8 unpacked to int8 in the kernel).

Inputs: stored int8 activation codes (act_quant) with their per-row, per-K-group sums; activation scale and
unsigned zero per [row, K-group] (any broadcast: per tensor, per row, per K-group); `int_affine` weights with
one group per output channel (group_size 0), their zero points and the cached per-K-group sums of the
signed weight codes (lowbit.quant_core.reference.weight_sums). Per K-group the kernel accumulates Σ xq·wq with int8 tl.dot into
int32, then applies the zero-point terms exactly in int32,
    acc_g = Σ xq·wq − zw·Σ xq − zx·Σ wq + K_g·zx·zw   (codes as fed to the dot: x − 128, w − weight_offset),
and adds sx[m, g]·acc_g into an fp32 tile; the epilogue multiplies by the weight scale and adds the bias.
Every partial result stays within 255² · K_g, which must fit int32: K_g <= 33025 (SDXL's largest K is 23040).
Reference: lowbit.quant_core.reference.int8_linear (exact int64 accumulators).
"""
import torch
import triton
import triton.language as tl

from .tiles import (INTERPRETER_CONFIG, interpreting, load_packed_tile, quick_bench, shared_memory_prune,
                    swizzled_tile)
from ..quant_core.reference import ACT_OFFSET, weight_offset

MAX_GROUP_K = 33025
X_OFFSET = tl.constexpr(ACT_OFFSET)


@triton.jit
def _int8_gemm_kernel(xq_ptr, xsum_ptr, sx_ptr, zx_ptr, q_ptr, sw_ptr, zw_ptr, wsum_ptr, bias_ptr, y_ptr,
                      M, N, K, row_bytes, stride_sm, stride_sg, stride_zm, stride_zg, group_k, n_groups,
                      BITS: tl.constexpr, W_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    zw = tl.load(zw_ptr + offs_n, mask=col_ok, other=0).to(tl.int32) - W_OFFSET
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, n_groups):
        k_start = group * group_k
        k_end = tl.minimum(k_start + group_k, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xq = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                         mask=row_ok[:, None] & (offs_k[None, :] < k_end), other=0)
            # entries past k_end read as code 0 (−W_OFFSET after the shift) but meet xq = 0
            wq = (load_packed_tile(q_ptr, row_bytes, offs_k, offs_n, k_end, N, BITS) - W_OFFSET).to(tl.int8)
            acc = tl.dot(xq, wq, acc, out_dtype=tl.int32)  # Triton 3.6 defaults out_dtype to fp32
        zx = tl.load(zx_ptr + offs_m * stride_zm + group * stride_zg, mask=row_ok, other=0).to(tl.int32)
        zx = zx - X_OFFSET
        sx = tl.load(sx_ptr + offs_m * stride_sm + group * stride_sg, mask=row_ok, other=0.0)
        xsum = tl.load(xsum_ptr + offs_m * n_groups + group, mask=row_ok, other=0)
        wsum = tl.load(wsum_ptr + offs_n * n_groups + group, mask=col_ok, other=0)
        # this order keeps every partial result within 255² · K_g (see MAX_GROUP_K)
        acc = (acc + ((k_end - k_start) * zx[:, None] * zw[None, :] - zw[None, :] * xsum[:, None])
               - zx[:, None] * wsum[None, :])
        out += acc.to(tl.float32) * sx[:, None]
    out = out * tl.load(sw_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# int8 mma wants BLOCK_K >= 32; thin-M configs serve the 77/154-token cross-attention K/V projections
_INT8_CONFIGS = [_config(128, 128, 64, 4, 4), _config(128, 256, 64, 8, 3), _config(256, 128, 64, 8, 3),
                 _config(64, 128, 128, 4, 4), _config(128, 64, 128, 4, 4), _config(32, 128, 128, 4, 4),
                 _config(16, 128, 256, 4, 3), _config(16, 64, 256, 4, 4)]
_int8_gemm_tuned = triton.autotune(_INT8_CONFIGS, key=["M", "N", "K", "group_k", "BITS"], do_bench=quick_bench,
                                   prune_configs_by={"early_config_prune": shared_memory_prune("xq_ptr", 1)}
                                   )(_int8_gemm_kernel)


def int8_linear(xq, xsum, x_scale, x_zero, qweight, w_scale, w_zero, wsum, bits, group_k=0, bias=None,
                out_dtype=torch.float16, config=None):
    """y [M, N] (out_dtype) from stored int8 codes xq [M, K] and their sums xsum [M, G]; x_scale (fp32) and
    x_zero (unsigned) broadcastable to [M, G]; qweight uint8 [N, K*bits/8], w_scale / w_zero [N, 1] (int_affine,
    group_size 0); wsum int32 [N, G] = reference.weight_sums(qweight, bits, group_k). `config` (block
    meta-parameters) bypasses autotuning: the interpreter checks use it."""
    M, K = xq.shape
    n_out = qweight.shape[0]
    group_k = group_k or K
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if group_k > MAX_GROUP_K:
        raise ValueError(f"int8 GEMM: K-group of {group_k} could overflow the int32 accumulator "
                         f"(at most {MAX_GROUP_K})")
    n_groups = triton.cdiv(K, group_k)
    sx = x_scale.to(device=xq.device, dtype=torch.float32).expand(M, n_groups)
    zx = x_zero.to(device=xq.device, dtype=torch.int32).expand(M, n_groups)
    y = torch.empty(M, n_out, device=xq.device, dtype=out_dtype)
    args = (xq, xsum, sx, zx, qweight, w_scale, w_zero, wsum, xq if bias is None else bias, y, M, n_out, K,
            qweight.shape[1], *sx.stride(), *zx.stride(), group_k, n_groups)
    meta = {"BITS": bits, "W_OFFSET": weight_offset(bits), "HAS_BIAS": bias is not None}

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)

    if config:
        _int8_gemm_kernel[grid](*args, **meta, **config)
    else:
        _int8_gemm_tuned[grid](*args, **meta)
    return y
