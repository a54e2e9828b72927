"""Kernels for the `vq` layout (additive vector quantization, VQDM/AQLM-style: M codebooks of 256 codewords
of length g, g = 8 in the VQDM formats).

`vq_linear`: y = x @ Ŵᵀ + bias. Per tile the kernel loads the code tile, gathers the codewords from the M
codebooks (16 KiB for 4 x 256 x 8, resident in L1/L2), sums them in fp32, rounds the unscaled tile to the activation
dtype and feeds tl.dot (fp32 accumulation); the per-row scale is applied in the epilogue. Small M
(<= tiles.SMALL_M) uses thin tiles and split-K; both families are autotuned for the SDXL shapes.
`vq_decode`: writes the dense scaled weight ([N, K] or Conv2d [N, in, kh, kw]); Conv2d runs it followed by
cuDNN (dequant-to-scratch). Whether an implicit-GEMM VQ conv beats that is pending GPU measurement.
References: lowbit.quant_core.reference.vq_linear / vq_decode.
"""
import torch
import triton
import triton.language as tl

from .tiles import (conv_layout, decode_blocks, launch_weight_only, split_k_range, swizzled_tile, tuned_pair,
                    weight_only_epilogue)


@triton.jit
def vq_weight_tile(codes_ptr, codebooks_ptr, offs_k, offs_n, K, N, NUM_BOOKS: tl.constexpr, G: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of the unscaled Ŵᵀ: Σ_m codebooks[m, codes[n, k // G, m], k % G], summed
    in order m like the layout's reference."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    code_at = offs_n[None, :].to(tl.int64) * (K // G * NUM_BOOKS) + (offs_k // G * NUM_BOOKS)[:, None]
    lane = (offs_k % G)[:, None]
    w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m in tl.static_range(NUM_BOOKS):
        code = tl.load(codes_ptr + code_at + m, mask=mask, other=0).to(tl.int32)
        w += tl.load(codebooks_ptr + (m * 256 + code) * G + lane).to(tl.float32)
    return w


@triton.jit
def _vq_gemm_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, M, N, K, stride_xm, stride_ym, codes_ptr, codebooks_ptr,
                    NUM_BOOKS: tl.constexpr, G: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    SPLIT_K: tl.constexpr):
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
        w = vq_weight_tile(codes_ptr, codebooks_ptr, offs_k, offs_n, K, N, NUM_BOOKS, G, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w.to(x.dtype), acc)
    weight_only_epilogue(acc, offs_m, offs_n, M, N, pid_k, y_ptr, stride_ym, scale_ptr, bias_ptr,
                         HAS_SCALE, HAS_BIAS, SPLIT_K)


_vq_gemm_tuned = tuned_pair(_vq_gemm_kernel)


@triton.jit
def _vq_decode_kernel(codes_ptr, codebooks_ptr, scale_ptr, out_ptr, N, K, NUM_BOOKS: tl.constexpr,
                      G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """Tile [BLOCK_N rows, BLOCK_GROUPS groups, G] of the matrix view [N, K]: each codeword is one contiguous
    G-vector load (16 bytes for g = 8 in fp16) and each row's output one contiguous run."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    lane = tl.arange(0, G)
    n_groups = K // G
    mask = (offs_n[:, None] < N) & (offs_g[None, :] < n_groups)
    code_at = offs_n[:, None].to(tl.int64) * (n_groups * NUM_BOOKS) + offs_g[None, :] * NUM_BOOKS
    w = tl.zeros((BLOCK_N, BLOCK_GROUPS, G), dtype=tl.float32)
    for m in tl.static_range(NUM_BOOKS):
        code = tl.load(codes_ptr + code_at + m, mask=mask, other=0).to(tl.int32)
        w += tl.load(codebooks_ptr + ((m * 256 + code) * G)[:, :, None] + lane[None, None, :]).to(tl.float32)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w = w * scale[:, None, None]
    dest = offs_n[:, None, None].to(tl.int64) * K + (offs_g * G)[None, :, None] + lane[None, None, :]
    tl.store(out_ptr + dest, w.to(out_ptr.dtype.element_ty), mask=mask[:, :, None])


def _book_meta(codebooks):
    return {"NUM_BOOKS": codebooks.shape[0], "G": codebooks.shape[2]}


def vq_linear(x2, codes, codebooks, scales, bias=None, config=None):
    """y [M, N] in x2's dtype (fp16/bf16) = x2 [M, K] @ Ŵᵀ + bias; codes uint8 [N, K/g, M], codebooks fp16
    [M, 256, g], scales fp16 [N, 1] (all contiguous); x2 needs unit stride along K."""
    return launch_weight_only(_vq_gemm_kernel, _vq_gemm_tuned, x2, codes.shape[0], (codes, codebooks),
                              _book_meta(codebooks), scales.reshape(-1), bias, config)


def vq_decode(codes, codebooks, scales, weight_shape, dtype, block_n=None, block_groups=None):
    """Dense scaled weight of logical shape weight_shape ([N, K] or [N, in, kh, kw]) in dtype."""
    block_n, block_groups = decode_blocks(block_n, block_groups, gpu_default=(16, 32))
    n_out, n_groups = codes.shape[0], codes.shape[1]
    K = n_groups * codebooks.shape[2]
    out = torch.empty(n_out, K, device=codes.device, dtype=dtype)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(n_groups, block_groups))
    _vq_decode_kernel[grid](codes, codebooks, scales, out, n_out, K, **_book_meta(codebooks), BLOCK_N=block_n,
                            BLOCK_GROUPS=block_groups)
    return conv_layout(out, weight_shape)
