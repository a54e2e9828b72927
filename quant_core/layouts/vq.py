"""Additive vector-quantized layout (VQDM / AQLM "MxBgG"): w ≈ scale[row] · Σ_m C_m[code_m] per group.

The matrix view [out, K] is cut into K/g groups of g = group_size consecutive entries per row (Conv2d: g input
channels at one kernel tap). Each group is the sum of one codeword from each of M codebooks, times the row's scale.

Tensors: `codes` uint8 [out, K/g, M] (codebook_bits = 8: 256 codewords per codebook), `codebooks` fp16
[M, 256, g], `scales` fp16 [out, 1]. Params: {"num_codebooks": M, "codebook_bits": 8, "group_size": g}.
Bits per weight: M·8/g for the codes + M·256·g·16/(out·K) for the codebooks + 16/K for the scales.
"""
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import FileFormatError
from . import Layout, register_layout

CODEBOOK_BITS = 8
CODEBOOK_SIZE = 2 ** CODEBOOK_BITS
MAX_CODEBOOKS = 8


def group_sums(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Σ_m codebooks[m, codes[..., m]]: codes [..., M] (any integer dtype) -> [..., g] in the codebooks' dtype."""
    total = None
    for m in range(codebooks.shape[0]):
        term = F.embedding(codes[..., m].long(), codebooks[m])
        total = term if total is None else total + term
    return total


@register_layout
class VQ(Layout):
    name = "vq"

    @classmethod
    def check_params(cls, params: Mapping) -> None:
        m, bits, g = params.get("num_codebooks"), params.get("codebook_bits"), params.get("group_size")
        if (not isinstance(m, int) or not 1 <= m <= MAX_CODEBOOKS or bits != CODEBOOK_BITS
                or not isinstance(g, int) or g <= 0):
            raise FileFormatError(f"vq: invalid params {dict(params)}; need num_codebooks 1..{MAX_CODEBOOKS}, "
                                  f"codebook_bits {CODEBOOK_BITS} and a positive group_size")

    @classmethod
    def tensor_specs(cls, params, out_features, in_features):
        m, g = params["num_codebooks"], params["group_size"]
        if in_features % g:
            raise FileFormatError(f"vq: K = {in_features} is not a multiple of group_size {g}")
        return {"codes": ((out_features, in_features // g, m), torch.uint8),
                "codebooks": ((m, CODEBOOK_SIZE, g), torch.float16),
                "scales": ((out_features, 1), torch.float16)}

    @classmethod
    def dequantize(cls, tensors, params, out_features, in_features):
        groups = group_sums(tensors["codes"], tensors["codebooks"].float())  # [out, K/g, g]
        return groups.reshape(out_features, in_features) * tensors["scales"].float()
