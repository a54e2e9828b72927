"""Activation quantization kernels feeding int8_gemm.

`quantize_static`: given scale/zero per tensor, per row (pixel/token groups) or per K-group (channel groups
after the layer's channel permutation). `quantize_dynamic_rows`: per-row min-max computed on the fly.
Both write the stored int8 codes (unsigned code − 128, see lowbit.quant_core.reference) and the per-row, per-group sums of those
codes, which the GEMM epilogue needs for the weight zero-point term. Optional `perm` gathers the input
channels in the order the weight's K was permuted to. References: lowbit.quant_core.reference.quantize_static /
quantize_dynamic_rows; outputs are bit-identical (IEEE division via tl.div_rn, round half to even).
"""
import torch
import triton
import triton.language as tl

from ..quant_core.reference import ACT_OFFSET

STORED_OFFSET = tl.constexpr(ACT_OFFSET)


@triton.jit
def round_half_even(v):
    """torch.round semantics; exact for |v| < 2^22, beyond which every caller clamps anyway."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def quantize_span(x_ptr, perm_ptr, xq_ptr, offs_m, row_ok, k_start, k_end, K, stride_xm, scale, zero,
                  QMAX: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr):
    """Quantize columns [k_start, k_end) of the rows offs_m with per-row scale/zero [BLOCK_M]; store the
    int8 codes and return their int32 row sums."""
    total = tl.zeros_like(offs_m)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        col_ok = offs_k < k_end
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=col_ok, other=0)
        else:
            cols = offs_k
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
        q = round_half_even(tl.div_rn(x.to(tl.float32), scale[:, None])) + zero[:, None]
        q = (tl.minimum(tl.maximum(q, 0.0), QMAX) - STORED_OFFSET).to(tl.int32)
        tl.store(xq_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], q.to(tl.int8), mask=mask)
        total += tl.sum(tl.where(mask, q, 0), axis=1)
    return total


@triton.jit
def _quantize_static_kernel(x_ptr, perm_ptr, scale_ptr, zero_ptr, xq_ptr, xsum_ptr, M, K, stride_xm, stride_sm,
                            stride_sg, stride_zm, stride_zg, group_k, n_groups, QMAX: tl.constexpr,
                            HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    row_ok = offs_m < M
    scale = tl.load(scale_ptr + offs_m * stride_sm + group * stride_sg, mask=row_ok, other=1.0)
    zero = tl.load(zero_ptr + offs_m * stride_zm + group * stride_zg, mask=row_ok, other=0).to(tl.float32)
    k_start = group * group_k
    k_end = tl.minimum(k_start + group_k, K)
    total = quantize_span(x_ptr, perm_ptr, xq_ptr, offs_m, row_ok, k_start, k_end, K, stride_xm, scale, zero,
                          QMAX, HAS_PERM, BLOCK_K)
    tl.store(xsum_ptr + offs_m * n_groups + group, total, mask=row_ok)


@triton.jit
def _quantize_dynamic_rows_kernel(x_ptr, perm_ptr, xq_ptr, xsum_ptr, scale_ptr, zero_ptr, M, K, stride_xm,
                                  QMAX: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    # masked entries read as 0, which the range must contain anyway
    lo = tl.zeros((BLOCK_M,), dtype=tl.float32)
    hi = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))
    scale = tl.div_rn(hi - lo, tl.full((BLOCK_M,), QMAX, tl.float32))
    scale = tl.where(scale > 0.0, scale, 1.0)
    zero = tl.minimum(tl.maximum(round_half_even(tl.div_rn(-lo, scale)), 0.0), QMAX)
    tl.store(scale_ptr + offs_m, scale, mask=row_ok)
    tl.store(zero_ptr + offs_m, zero.to(tl.int32), mask=row_ok)
    total = quantize_span(x_ptr, perm_ptr, xq_ptr, offs_m, row_ok, 0, K, K, stride_xm, scale, zero, QMAX,
                          HAS_PERM, BLOCK_K)
    tl.store(xsum_ptr + offs_m, total, mask=row_ok)


def _perm_arg(perm, x2):
    return (x2, False) if perm is None else (perm.to(device=x2.device, dtype=torch.int32), True)


def quantize_static(x2, scale, zero, bits, group_k=0, perm=None, block_m=32, block_k=128):
    """x2 [M, K] (unit stride along K) -> (xq int8 [M, K], xsum int32 [M, G]); scale/zero broadcastable to
    [M, G] as in reference.quantize_static."""
    M, K = x2.shape
    group_k = group_k or K
    n_groups = triton.cdiv(K, group_k)
    scale = scale.to(device=x2.device, dtype=torch.float32).expand(M, n_groups)
    zero = zero.to(device=x2.device, dtype=torch.int32).expand(M, n_groups)
    xq = torch.empty(M, K, device=x2.device, dtype=torch.int8)
    xsum = torch.empty(M, n_groups, device=x2.device, dtype=torch.int32)
    perm_t, has_perm = _perm_arg(perm, x2)
    block_k = min(block_k, triton.next_power_of_2(group_k))
    _quantize_static_kernel[(triton.cdiv(M, block_m), n_groups)](
        x2, perm_t, scale, zero, xq, xsum, M, K, x2.stride(0), *scale.stride(), *zero.stride(), group_k, n_groups,
        QMAX=2 ** bits - 1, HAS_PERM=has_perm, BLOCK_M=block_m, BLOCK_K=block_k)
    return xq, xsum


def quantize_dynamic_rows(x2, bits, perm=None, block_m=32, block_k=128):
    """Per-row min-max quantization: (xq int8 [M, K], xsum int32 [M, 1], scale fp32 [M, 1], zero int32 [M, 1])."""
    M, K = x2.shape
    xq = torch.empty(M, K, device=x2.device, dtype=torch.int8)
    xsum = torch.empty(M, 1, device=x2.device, dtype=torch.int32)
    scale = torch.empty(M, 1, device=x2.device, dtype=torch.float32)
    zero = torch.empty(M, 1, device=x2.device, dtype=torch.int32)
    perm_t, has_perm = _perm_arg(perm, x2)
    _quantize_dynamic_rows_kernel[(triton.cdiv(M, block_m),)](
        x2, perm_t, xq, xsum, scale, zero, M, K, x2.stride(0), QMAX=2 ** bits - 1, HAS_PERM=has_perm,
        BLOCK_M=block_m, BLOCK_K=block_k)
    return xq, xsum, scale, zero
