"""The torch reference of every op a kernel implements: the executable specification of what it computes.

Weight decodes are the layouts' own `dequantize` (lowbit.quant_core.layouts), put in the logical weight shape by
`weight_from_matrix`; the fused GEMMs and the integer path are specified here with the same arithmetic in the
same order and precision as their kernels (fp32 weight reconstruction, rounding to the activation dtype, fp32
accumulation, fp32 epilogue; exact integer accumulators for the int8 GEMM), so a kernel may differ from its
reference only by the summation order of the fp32 accumulation. They run on any device; the integer path here is
the reference branch of lowbit.quant_core.ops, and every kernel check compares against these functions.

Integer activation convention shared by act_quant and int8_gemm: an asymmetric b-bit activation code
q = clamp(round_half_even(x / scale) + zero, 0, 2^b − 1) is stored as the int8 q − 128, so the int8 tensor
cores can consume it; `zero` is always given in the unsigned domain [0, 2^b − 1].
"""
import torch

from .layouts import get_layout, weight_from_matrix
from .layouts.int_affine import affine_params
from .layouts.vq import group_sums
from .packing import unpack_bits

ACT_OFFSET = 128  # stored int8 activation = unsigned code − 128


def weight_offset(bits: int) -> int:
    """What the int8 GEMM subtracts from an unsigned weight code so that it fits int8 (8-bit codes only)."""
    return 128 if bits == 8 else 0


# ---- int_affine (weight-only) ---------------------------------------------------------------------------

def affine_matrix(qweight, scale, zero, bits, group_size):
    """fp32 [N, K] matrix view: the int_affine layout's dequantize."""
    n_out, K = qweight.shape[0], qweight.shape[1] * 8 // bits
    return get_layout("int_affine").dequantize({"qweight": qweight, "scale": scale, "zero": zero},
                                                {"bits": bits, "group_size": group_size}, n_out, K)


def affine_linear(x2, qweight, scale, zero, bits, group_size, bias=None):
    w = affine_matrix(qweight, scale, zero, bits, group_size).to(x2.dtype)
    return _epilogue(x2.float() @ w.float().T, None, bias, x2.dtype)


def affine_decode(qweight, scale, zero, bits, group_size, weight_shape, dtype):
    return weight_from_matrix(affine_matrix(qweight, scale, zero, bits, group_size).to(dtype), weight_shape)


def _epilogue(acc, scale, bias, dtype):
    if scale is not None:
        acc = acc * scale.float().reshape(1, -1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


# ---- vq (additive codebooks) ----------------------------------------------------------------------------

def vq_codeword_sums(codes, codebooks):
    """fp32 [N, K] unscaled matrix view: Σ_m codebooks[m, codes[n, k // g, m], k % g], summed in order m
    (the order of the layout's reference, lowbit.quant_core.layouts.vq.group_sums)."""
    return group_sums(codes, codebooks.float()).reshape(codes.shape[0], -1)


def vq_linear(x2, codes, codebooks, scales, bias=None):
    """Unscaled codeword sums rounded to the activation dtype, fp32 matmul, per-row scale and bias after."""
    w = vq_codeword_sums(codes, codebooks).to(x2.dtype)
    return _epilogue(x2.float() @ w.float().T, scales, bias, x2.dtype)


def vq_decode(codes, codebooks, scales, weight_shape, dtype):
    """The vq layout's dequantize, in the logical weight shape."""
    g = codebooks.shape[2]
    w = get_layout("vq").dequantize({"codes": codes, "codebooks": codebooks, "scales": scales},
                                    {"group_size": g}, codes.shape[0], codes.shape[1] * g)
    return weight_from_matrix(w.to(dtype), weight_shape)


# ---- activation quantization ----------------------------------------------------------------------------

def _codes(x, scale, zero, qmax):
    """Unsigned codes (fp32 holding integers): clamp(round_half_even(x / scale) + zero, 0, qmax)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax)


def _stored(q, group_k):
    """(int8 q − 128 [M, K], int32 Σ_k (q − 128) per row and K-group [M, G])."""
    stored = (q - ACT_OFFSET).to(torch.int8)
    M, K = q.shape
    groups = -(-K // group_k)
    padded = torch.nn.functional.pad(stored.to(torch.int32), (0, groups * group_k - K))
    return stored, padded.reshape(M, groups, group_k).sum(-1, dtype=torch.int32)


def quantize_static(x2, scale, zero, bits, group_k=0, perm=None):
    """Quantize x2 [M, K] with given parameters (scale fp32, zero in [0, 2^bits − 1]) broadcastable to
    [M, G], G = K / group_k groups of consecutive (permuted) channels, or one group if group_k == 0:
    shape [] or [1, 1] per tensor, [M, 1] per row, [1, G] per K-group.
    perm: the input channel order the weight was permuted to; column k is x2[:, perm[k]].
    Returns (xq int8 [M, K], xsum int32 [M, G])."""
    x = (x2 if perm is None else x2[:, perm.to(x2.device)]).float()
    M, K = x.shape
    group_k = group_k or K
    cols = torch.arange(K, device=x.device) // group_k
    s = scale.to(x.device).float().expand(M, -(-K // group_k))[:, cols]
    z = zero.to(x.device).float().expand(M, -(-K // group_k))[:, cols]
    return _stored(_codes(x, s, z, 2 ** bits - 1), group_k)


def dynamic_row_params(x2, bits):
    """Per-row min-max parameters (affine_params of each row's range). Returns (scale fp32 [M, 1], zero int32
    [M, 1])."""
    x = x2.float()
    return affine_params(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), bits)


def quantize_dynamic_rows(x2, bits, perm=None):
    """Per-row dynamic quantization. Returns (xq int8 [M, K], xsum int32 [M, 1], scale [M, 1], zero [M, 1])."""
    scale, zero = dynamic_row_params(x2, bits)
    xq, xsum = quantize_static(x2, scale, zero, bits, 0, perm)
    return xq, xsum, scale, zero


# ---- integer GEMM (W8A8 / W4A8) -------------------------------------------------------------------------

def signed_weight_codes(qweight, bits):
    """int32 [N, K]: unsigned weight codes minus weight_offset(bits), the int8 values the kernel feeds to
    tl.dot."""
    K = qweight.shape[1] * 8 // bits
    return unpack_bits(qweight, bits, K).to(torch.int32) - weight_offset(bits)


def weight_sums(qweight, bits, group_k=0):
    """int32 [N, G]: Σ_k of the signed weight codes per K-group; computed once per layer and cached."""
    w = signed_weight_codes(qweight, bits)
    n_out, K = w.shape
    group_k = group_k or K
    groups = -(-K // group_k)
    padded = torch.nn.functional.pad(w, (0, groups * group_k - K))
    return padded.reshape(n_out, groups, group_k).sum(-1, dtype=torch.int32)


def int8_accumulators(xq, x_zero, qweight, w_zero, bits, group_k=0):
    """Exact int64 [M, N, G]: Σ_{k in group g} (x_code − x_zero)(w_code − w_zero), expanded as the kernel
    does: Σ xq·wq − zw·Σ xq − zx·Σ wq + K_g·zx·zw on offset codes. x_zero broadcastable to [M, G], w_zero [N].
    The products are summed in float64, exact because |Σ| < 2^53."""
    M, K = xq.shape
    group_k = group_k or K
    groups = -(-K // group_k)
    w = signed_weight_codes(qweight, bits)
    n_out = w.shape[0]
    zx = x_zero.to(device=xq.device, dtype=torch.int64).expand(M, groups) - ACT_OFFSET
    zw = w_zero.to(torch.int64).reshape(n_out) - weight_offset(bits)
    out = torch.empty(M, n_out, groups, dtype=torch.int64, device=xq.device)
    for g in range(groups):
        cols = slice(g * group_k, min(K, (g + 1) * group_k))
        xs, ws = xq[:, cols].to(torch.float64), w[:, cols].to(torch.float64)
        dot = (xs @ ws.T).to(torch.int64)
        k_g = ws.shape[1]
        out[:, :, g] = (dot - zw[None, :] * xs.sum(1).to(torch.int64)[:, None]
                        - zx[:, g, None] * ws.sum(1).to(torch.int64)[None, :] + k_g * zx[:, g, None] * zw[None, :])
    return out


def int8_linear(xq, x_scale, x_zero, qweight, w_scale, w_zero, bits, group_k=0, bias=None,
                out_dtype=torch.float16):
    """y [M, N] = Σ_g x_scale[m, g] · acc[m, n, g], then · w_scale[n] + bias[n], in fp32, cast to out_dtype.
    x_scale, x_zero broadcastable to [M, G]; w_scale, w_zero [N] or [N, 1] (per output channel)."""
    acc = int8_accumulators(xq, x_zero, qweight, w_zero, bits, group_k)
    M, n_out, groups = acc.shape
    sx = x_scale.to(xq.device).float().expand(M, groups)
    y = torch.zeros(M, n_out, dtype=torch.float32, device=xq.device)
    for g in range(groups):
        y = y + acc[:, :, g].float() * sx[:, g, None]
    y = y * w_scale.float().reshape(1, n_out)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
