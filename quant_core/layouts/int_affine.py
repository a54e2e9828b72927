"""Asymmetric integer layout: w = (q - zero) * scale per output row and group of K entries.

Tensors: `qweight` uint8 [out, K*bits/8] (bit-packed, two int4 per byte), `scale` fp16 [out, G],
`zero` uint8 [out, G] with G = ceil(K / group_size); group_size 0 means one group per row
(per-output-channel). The last group of a row may be shorter when group_size does not divide K.
"""
import math
from typing import Mapping

import torch

from ..errors import FileFormatError
from ..packing import pack_bits, packed_size, unpack_bits
from . import Layout, register_layout

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, K] -> [out, G, g], zero-padded at the end of each row."""
    out, k = w.shape
    g = k if group_size == 0 else group_size
    n_groups = math.ceil(k / g)
    if n_groups * g != k:
        w = torch.nn.functional.pad(w, (0, n_groups * g - k))
    return w.reshape(out, n_groups, g)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, stored_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32, zero int32) of asymmetric `bits`-bit grids spanning the ranges [lo, hi] widened to contain 0
    (elementwise): scale = (hi − lo) / (2^b − 1), 1 where a range is empty; zero = clamp(round(−lo / scale), 0,
    2^b − 1). The one range convention of weights, activations and the integer path (lowbit.quant_core.reference).
    stored_dtype: the scale is first rounded up to a value that dtype holds (weights store fp16 scales), so the
    grid still spans [lo, hi] and the zero point fits the stored scale."""
    qmax = 2 ** bits - 1
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    # a tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal, one ulp off the
    # kernels' IEEE division (seen on an H200: activation codes off by one)
    scale = (hi - lo) / torch.full_like(hi, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if stored_dtype is not None:
        stored = scale.to(stored_dtype)
        scale = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, torch.inf)),
                            stored).float()
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero.to(torch.int32)


def quantize_int_affine(w: torch.Tensor, bits: int, group_size: int, range_search: bool = False) -> dict:
    """Round-to-nearest min-max quantization of a [out, K] matrix.

    range_search: per group, try shrinking the range (factors 0.975 down to 0.25) and keep the one with the
    lowest squared error, the MSE-searched clipping of scalar PTQ methods.
    """
    if bits not in SUPPORTED_BITS:
        raise FileFormatError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")
    out, k = w.shape
    wg = _grouped(w.float(), group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    qmax = 2 ** bits - 1

    def codes(scale, zero):
        return (wg / scale[..., None]).round_().add_(zero[..., None]).clamp_(0, qmax)

    scale, zero = affine_params(lo, hi, bits, torch.float16)
    q = codes(scale, zero)
    if range_search:
        best_err = ((q - zero[..., None]) * scale[..., None] - wg).pow_(2).sum(-1)
        for shrink in torch.linspace(0.975, 0.25, 30).tolist():
            s2, z2 = affine_params(lo * shrink, hi * shrink, bits, torch.float16)
            q2 = codes(s2, z2)
            err = ((q2 - z2[..., None]) * s2[..., None] - wg).pow_(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale, zero = torch.where(better, s2, scale), torch.where(better, z2, zero)
            q = torch.where(better[..., None], q2, q)
    q = q.reshape(out, -1)[:, :k].to(torch.uint8)
    return {"qweight": pack_bits(q, bits), "scale": scale.to(torch.float16), "zero": zero.to(torch.uint8)}


@register_layout
class IntAffine(Layout):
    name = "int_affine"

    @classmethod
    def check_params(cls, params: Mapping) -> None:
        bits, group = params.get("bits"), params.get("group_size")
        if bits not in SUPPORTED_BITS or not isinstance(group, int) or group < 0 or group % 8:
            raise FileFormatError(f"int_affine: invalid params {dict(params)}; bits must be one of "
                                  f"{SUPPORTED_BITS} and group_size 0 or a multiple of 8")

    @classmethod
    def tensor_specs(cls, params, out_features, in_features):
        bits, g = params["bits"], params["group_size"]
        n_groups = num_groups(in_features, g)
        return {"qweight": ((out_features, packed_size(in_features, bits)), torch.uint8),
                "scale": ((out_features, n_groups), torch.float16),
                "zero": ((out_features, n_groups), torch.uint8)}

    @classmethod
    def dequantize(cls, tensors, params, out_features, in_features):
        bits, g = params["bits"], params["group_size"]
        w = _grouped(unpack_bits(tensors["qweight"], bits, in_features).float(), g)
        # in place: this runs on every forward of the reference path
        w.sub_(tensors["zero"].float()[..., None]).mul_(tensors["scale"].float()[..., None])
        return w.reshape(out_features, -1)[:, :in_features]
