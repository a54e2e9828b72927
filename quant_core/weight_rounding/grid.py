"""A quantized int_affine layer's grid beside the full-precision weight: what every rounding works on."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import LowBitError
from ..layouts import matrix_view, weight_from_matrix
from ..packing import pack_bits, unpack_bits


@dataclass
class Grid:
    """A quantized int_affine layer's fixed grid next to the full-precision weight it encodes, all [out, K] fp32
    in the layer's stored column order (stored column j is matrix-view column perm[j] when the layer permutes
    its input channels, lowbit.quant_core.actquant)."""
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    perm: Optional[torch.Tensor]
    weight_shape: torch.Size

    @classmethod
    def of(cls, module: nn.Module, layer) -> "Grid":
        if layer.layout.name != "int_affine":
            raise LowBitError(f"weight rounding works on int_affine layers, not {layer.layout.name}")
        w = matrix_view(module.weight.detach()).float()
        perm = getattr(layer, "act_in_perm", None)
        perm = None if perm is None else perm.detach().long().to(w.device)
        if perm is not None:
            w = w[:, perm]
        k, group = w.shape[1], layer.params["group_size"]
        column_group = torch.arange(k, device=w.device) // (group or k)
        return cls(w, layer.scale.detach().float().to(w.device)[:, column_group],
                   layer.zero.detach().float().to(w.device)[:, column_group], layer.params["bits"], perm,
                   module.weight.shape)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def nearest_codes(self) -> torch.Tensor:
        """Round-to-nearest codes, as lowbit.quant_core.layouts.int_affine.quantize_int_affine gives them."""
        return (self.weight / self.scale).round().add(self.zero).clamp(0, self.qmax)

    def dense(self, codes: torch.Tensor) -> torch.Tensor:
        """The weight in its logical shape (fp32) that `codes` ([out, K], stored order) decode to."""
        m = (codes - self.zero) * self.scale
        if self.perm is not None:
            m = m[:, torch.argsort(self.perm)]
        return weight_from_matrix(m, self.weight_shape)


def set_codes(layer, codes: torch.Tensor) -> None:
    """Store `codes` ([out, K] in stored order, integral floats) as the layer's packed qweight, in place."""
    layer.qweight.data.copy_(pack_bits(codes.to(torch.uint8), layer.params["bits"]).to(layer.qweight.device))


def stored_codes(layer) -> torch.Tensor:
    return unpack_bits(layer.qweight.detach(), layer.params["bits"], layer.in_features).float()
